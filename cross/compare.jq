# Compares two streams of anotador JSON envelopes (one per line):
#   jq -n --slurpfile a NATIVE.jsonl --slurpfile b OTHER.jsonl --argjson tol 1e-3 -f cross/compare.jq
# Everything must be equal except `score` values (f32 printed as JSON), which may
# differ by `tol`, and `timings_ms`, which is ignored. Prints a one-line summary
# {"lines": N, "max_score_diff": D, "mismatches": [first 5], "ok": BOOL}; the caller
# checks `.ok`.
def absv: if . < 0 then -. else . end;
# Paths where the two values differ beyond tolerance, with the difference.
def diff($x; $y; $path; $key):
  if ($x | type) != ($y | type) then [{path: $path, native: $x, other: $y}]
  elif ($x | type) == "object" then
    (($x | keys) - ["timings_ms"]) as $kx | (($y | keys) - ["timings_ms"]) as $ky
    | if $kx != $ky then [{path: $path, keys_native: $kx, keys_other: $ky}]
      else [ $kx[] as $k | diff($x[$k]; $y[$k]; $path + [$k]; $k)[] ] end
  elif ($x | type) == "array" then
    if ($x | length) != ($y | length) then [{path: $path, len_native: ($x | length), len_other: ($y | length)}]
    else [ range(0; $x | length) as $i | diff($x[$i]; $y[$i]; $path + [$i]; $key)[] ] end
  elif ($x | type) == "number" and $key == "score" then
    if (($x - $y) | absv) <= $tol then [] else [{path: $path, native: $x, other: $y}] end
  elif $x == $y then []
  else [{path: $path, native: $x, other: $y}] end;
def scores: [.. | objects | select(has("score")) | .score];
($a | length) as $n
| if $n != ($b | length) then {lines: $n, other_lines: ($b | length), ok: false}
  else
    [range(0; $n) as $i | diff($a[$i]; $b[$i]; [$i]; null)[]] as $m
    | ([range(0; $n) as $i | [($a[$i] | scores), ($b[$i] | scores)] | transpose[]
        | select(length == 2 and (.[0] | type) == "number" and (.[1] | type) == "number")
        | (.[0] - .[1]) | absv] | max // 0) as $d
    | {lines: $n, max_score_diff: $d, mismatches: $m[0:5], ok: ($m | length == 0)}
  end
