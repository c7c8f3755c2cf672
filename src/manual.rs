//! `anotador generate man`: manual pages from the clap definitions (part of the binary,
//! not of the library). clap_mangen renders name, synopsis, description, options and
//! subcommands; the sections a daemon's page needs beyond its options (files, signals,
//! environment, exit status, see also) are written here as roff, because they say what
//! no `--help` line does: where the package puts things and how systemd drives it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The sections of anotador.1 after the generated ones. Roff: `\-` is a minus sign
/// (a bare `-` may be rendered as a hyphen and breaks copy-paste of options).
const MAIN_EXTRA: &str = r#".SH FILES
.TP
\fB/etc/anotador/anotador.toml\fR
The daemon's configuration (\fBanotador run \-\-config\fR, \fBanotador check \-\-config\fR):
models, routes, the broker. Commented; relative paths in it are resolved against its folder.
.TP
\fB/usr/share/anotador/models/\fR
The shipped model bundles (ner\-es, pos\-es, emotion\-es): model.onnx, tokenizer.json,
config.json and a model card (README.md) each.
.TP
\fB/lib/systemd/system/anotador.service\fR
The systemd unit (Type=notify, watchdog); enabled but not started on installation.
.TP
\fB/usr/share/doc/anotador/\fR
README.md and docs/: daemon, broker, raspberry\-pi, batch, models, performance, reliability.
.SH SIGNALS
.TP
\fBSIGHUP\fR
\fBanotador run\fR reads its configuration again and switches models and routes between two
messages (\fBsystemctl reload anotador\fR); the embedded broker's password, ACL and TLS
certificate files are read again too. A configuration that does not load changes nothing.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop taking messages, let those taken finish (daemon.shutdown_timeout_s), publish the offline
status, disconnect.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter (env_logger syntax), e.g. \fBinfo\fR or \fBinfo,anotador=debug\fR. Message text and
results are never logged at info or above.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd: readiness and watchdog notifications.
.SH EXIT STATUS
0 on success; 1 on any error, which is printed on standard error (a configuration that does
not load, a model that fails its checks, a broker that refuses the daemon).
.SH EXAMPLES
.nf
anotador run \-\-config /etc/anotador/anotador.toml
anotador ask 'El Real Madrid ganó en Sevilla ante el Betis.'
echo 'Hola desde Madrid' | anotador annotate \-\-model /usr/share/anotador/models/ner\-es
anotador bench \-\-model /usr/share/anotador/models/ner\-es
.fi
.SH SEE ALSO
\fBmosquitto\fR(8), \fBmosquitto_pub\fR(1), \fBsystemctl\fR(1)
"#;

/// Writes anotador.1 and anotador-SUBCOMMAND.1 for each visible subcommand into `dir`
/// and returns their paths, in that order.
pub fn write_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("anotador {}", env!("CARGO_PKG_VERSION"));
    let subcommands = visible(&cmd);
    let mut written = Vec::new();
    let see_also = subcommands
        .iter()
        .map(|s| format!("\\fB{}\\fR(1)", page_name(s)))
        .collect::<Vec<_>>()
        .join(", ");
    written.push(write_page(
        clap_mangen::Man::new(cmd.clone())
            .source(source.clone())
            .manual("anotador manual"),
        dir,
        &format!("{MAIN_EXTRA}.PP\n{see_also}\n"),
    )?);
    for sub in subcommands {
        write_subcommand_pages(sub, dir, &source, &mut written)?;
    }
    Ok(written)
}

/// A subcommand's page, then its own subcommands' (`anotador-generate-man`): the
/// SUBCOMMANDS section of a page names theirs, so each must exist.
fn write_subcommand_pages(
    cmd: clap::Command,
    dir: &Path,
    source: &str,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let children = visible(&cmd);
    written.push(write_page(
        clap_mangen::Man::new(cmd)
            .source(source)
            .manual("anotador manual"),
        dir,
        ".SH SEE ALSO\n\\fBanotador\\fR(1)\n",
    )?);
    for child in children {
        write_subcommand_pages(child, dir, source, written)?;
    }
    Ok(())
}

/// The subcommands `--help` lists (each gets a page).
fn visible(cmd: &clap::Command) -> Vec<clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect()
}

/// `anotador-run`: clap sets a subcommand's display name to the path from the top
/// command once the parent is built.
fn page_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
}

fn write_page(man: clap_mangen::Man, dir: &Path, extra: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(man.get_filename());
    let mut out = Vec::new();
    man.render(&mut out)?;
    out.extend_from_slice(extra.as_bytes());
    let mut file = std::fs::File::create(&path)?;
    file.write_all(&out)?;
    file.flush()?;
    Ok(path)
}
