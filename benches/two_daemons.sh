#!/bin/bash
# Two daemons in one $share group vs one daemon, same Mosquitto, same messages.
# usage: benches/two_daemons.sh BIN N_MESSAGES [ROUNDS]   (needs mosquitto, mosquitto-clients, jq)
set -euo pipefail
BIN=$1; N=$2; ROUNDS=${3:-2}
D=$(mktemp -d /tmp/anotador-2d.XXXXXX); ROOT=$(cd "$(dirname "$0")/.." && pwd); cd $D
PORT=18830
cat > mosq.conf <<EOC
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
EOC
mk() { # name
cat > $1.toml <<EOC
[daemon]
name = "$1"
status_topic = "anotador/{name}/status"
stats_topic = "anotador/{name}/stats"
stats_interval_s = 600
queue = 32
[broker]
host = "127.0.0.1"
port = $PORT
client_id = "$1"
clean_session = true
[models.ner]
path = "$ROOT/models/ner-es"
workers = 1
max_windows = 16
[[routes]]
topic = "\$share/g/anotador/in/ner/#"
model = "ner"
format = "json"
output = "anotador/out/ner/{1}"
errors = "anotador/errors/ner/{1}"
EOC
}
mk d1; mk d2
# messages: the 40 paragraphs of benches/messages-es.txt cycled, as JSON lines
jq -R -s -c --argjson n "$N" 'split("\n") | map(select(length > 0)) as $l
  | range(0; $n) | {id: ., text: $l[. % ($l | length)]}' "$ROOT/benches/messages-es.txt" > msgs.jsonl
/usr/sbin/mosquitto -c mosq.conf > mosq.log 2>&1 & MP=$!
sleep 0.5
trap "kill $MP 2>/dev/null; pkill -f \"$D/d[12].toml\" 2>/dev/null; rm -rf $D" EXIT
one() { # daemons...
  local pids=()
  for d in "$@"; do RUST_LOG=warn $BIN run --config $D/$d.toml > $d.log 2>&1 & pids+=($!); done
  # wait until each is subscribed (its retained online status)
  for d in "$@"; do timeout 30 mosquitto_sub -p $PORT -t "anotador/$d/status" -C 1 -W 30 > /dev/null; done
  sleep 1
  mosquitto_sub -p $PORT -t 'anotador/out/ner/#' -t 'anotador/errors/ner/#' -q 1 -C $N > out.txt & local sp=$!
  sleep 0.3
  local t0=$(date +%s.%N)
  mosquitto_pub -p $PORT -t anotador/in/ner/b -q 1 -l < msgs.jsonl
  wait $sp
  local t1=$(date +%s.%N)
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  local errs=$(grep -c '"error"' out.txt || true)
  awk -v n=$N -v a=$t0 -v b=$t1 -v k=$# -v e=$errs 'BEGIN{printf "%d daemon(s): %d answers (%d errors) in %.2f s = %.1f msg/s\n", k, n, e, b-a, n/(b-a)}'
}
for r in $(seq 1 $ROUNDS); do
  if [ $((r%2)) = 1 ]; then one d1; one d1 d2; else one d1 d2; one d1; fi
done
