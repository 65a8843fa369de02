//! `paywatch completions SHELL` and the packaging-time `paywatch man --out-dir DIR`: shell
//! completions and man pages, generated from the same clap definitions the parser uses.
//!
//! Owns: turning [`Cli`]'s clap command into completion scripts and roff man pages.
//! Must never: describe the command line by hand (it would drift from the parser).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Arguments of `paywatch completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Arguments of `paywatch man` (used when packaging).
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory to write paywatch.1 and one page per subcommand into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// The command line as a person sees it: [`Cli`] without its hidden subcommands (`man`,
/// `demo-hook`), which clap's generators would otherwise offer.
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let mut visible = clap::Command::new("paywatch")
        .args(full.get_arguments().cloned())
        .subcommands(
            full.get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        );
    if let Some(about) = full.get_about() {
        visible = visible.about(about.clone());
    }
    visible.version(env!("CARGO_PKG_VERSION"))
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut visible_command(), "paywatch", &mut script);
    script
}

/// `paywatch completions SHELL`: prints the script on stdout.
pub fn print_completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&completions(args.shell))
        .and_then(|()| stdout.flush())
        .context("writing the completion script to stdout")
}

/// The sections of `paywatch(1)` that clap knows nothing of, in roff.
const MAIN_PAGE_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/paywatch/paywatch.toml\fR
The configuration file (see \fBpaywatch.toml\fR(5)); \fB\-\-config\fR or \fBPAYWATCH_CONFIG\fR names another.
.TP
\fI/var/lib/paywatch/paywatch.db\fR
The ledger ([ledger] path): checkouts, verified history, the hook outbox and Listen resume
state, with its \fI\-wal\fR, \fI\-shm\fR and \fI.lock\fR companions.
.TP
\fI/usr/share/doc/paywatch/running\-as\-a\-service.md\fR
The service guide: credentials, auth modes, operating and upgrading.
.SH ENVIRONMENT
.TP
\fBPAYWATCH_CONFIG\fR
The configuration file, as \fB\-\-config\fR.
.TP
\fBPAYWATCH_\fISECTION\fB__\fIKEY\fR
Overrides one setting, e.g. \fBPAYWATCH_PAYMENNT__BASE_URL\fR, \fBPAYWATCH_LEDGER__PATH\fR.
.TP
\fBCREDENTIALS_DIRECTORY\fR
systemd credentials: paymennt\-api\-key, paymennt\-api\-secret, firestore\-service\-account.
.TP
\fBRUST_LOG\fR
A log filter that wins over [log] level.
.TP
\fBNO_COLOR\fR
No colours on a terminal.
.SH EXIT STATUS
.TP
\fB0\fR
Success.
.TP
\fB1\fR
A runtime failure: paymennt unreachable or refusing a request, a ledger error, a daemon task
that ended.
.TP
\fB2\fR
A usage, input or configuration error (bad arguments or config, an id that names nothing
paywatch holds, API credentials paymennt refused at start); nothing was changed.
.TP
\fB3\fR
\fBlink create\fR or \fBwebhooks register\fR: the outcome is unknown (paymennt may have
created the link or webhook, and looking for it found nothing); check the order and requestId
(or the address) named in the message before trying again.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop taking new work, let verifications and hooks finish within [daemon] drain_timeout, exit.
.TP
\fBSIGHUP\fR
Re-read the configuration: hooks, log level, reconcile interval and paymennt credentials take
effect at once; the log names what changed and what needs a restart.
.SH SEE ALSO
\fBpaywatch.toml\fR(5), \fBsystemctl\fR(1), \fBjournalctl\fR(1)
"#;

/// `paywatch.toml(5)`: the shipped, commented example file is the description of every key,
/// so the page cannot drift from it.
fn config_page() -> String {
    let example = include_str!("../../config/paywatch.toml");
    let mut page = format!(
        ".TH paywatch.toml 5 \"\" \"paywatch {}\"\n\
         .SH NAME\npaywatch.toml \\- configuration file of paywatch(1)\n\
         .SH DESCRIPTION\n\
         paywatch reads \\fI/etc/paywatch/paywatch.toml\\fR (or the file \\fB\\-\\-config\\fR names): TOML, \
         one table per section. Every key is optional; an unknown key is an error naming its line. \
         Each numeric setting has bounds, stated beside it. Any key can be overridden by an \
         environment variable \\fBPAYWATCH_\\fISECTION\\fB__\\fIKEY\\fR.\n\
         .SH KEYS\nThe shipped example, every key with its default and meaning:\n.PP\n.nf\n",
        env!("CARGO_PKG_VERSION")
    );
    for line in example.lines() {
        let escaped = line.replace('\\', "\\e");
        if escaped.starts_with('.') || escaped.starts_with('\'') {
            page.push_str("\\&");
        }
        page.push_str(&escaped);
        page.push('\n');
    }
    page.push_str(".fi\n.SH SEE ALSO\n\\fBpaywatch\\fR(1)\n");
    page
}

/// Writes the man pages into `dir`: `paywatch.1`, one section-1 page per visible subcommand
/// and `paywatch.toml.5`. Returns the section-1 paths, `paywatch.1` first.
///
/// # Errors
///
/// The directory cannot be created or a page cannot be written.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory '{}'", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into '{}'", dir.display()))?;
    let man = clap_mangen::Man::new(visible_command());
    let mut main = Vec::new();
    man.render_title(&mut main)
        .and_then(|()| man.render_name_section(&mut main))
        .and_then(|()| man.render_synopsis_section(&mut main))
        .and_then(|()| man.render_description_section(&mut main))
        .and_then(|()| man.render_options_section(&mut main))
        .and_then(|()| man.render_subcommands_section(&mut main))
        .context("rendering paywatch.1")?;
    main.extend_from_slice(MAIN_PAGE_SECTIONS.as_bytes());
    man.render_version_section(&mut main)
        .context("rendering paywatch.1")?;
    let write = |name: &str, content: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("cannot write '{}'", path.display()))
    };
    write("paywatch.1", &main)?;
    write("paywatch.toml.5", config_page().as_bytes())?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list '{}'", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("paywatch") && name.ends_with(".1"))
        })
        .collect();
    pages.sort_by_key(|path| {
        (
            path.file_name() != Some("paywatch.1".as_ref()),
            path.clone(),
        )
    });
    Ok(pages)
}

/// `paywatch man --out-dir DIR`: writes the pages and lists them on stdout.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    for page in write_man_pages(&args.out_dir)? {
        super::output::write_out(&page.display().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    #[test]
    fn completions_name_the_subcommands_in_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completions(shell)).expect("UTF-8");
            assert!(!script.is_empty(), "{shell}: empty script");
            for subcommand in [
                "run",
                "demo",
                "check-config",
                "sandbox",
                "hooks",
                "completions",
            ] {
                assert!(
                    script.contains(subcommand),
                    "{shell} completions do not name '{subcommand}'"
                );
            }
            for hidden in ["demo-hook", "out-dir"] {
                assert!(
                    !script.contains(hidden),
                    "{shell} completions offer the hidden '{hidden}'"
                );
            }
        }
    }

    #[test]
    fn man_pages_are_written_for_the_command_and_its_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pages = write_man_pages(&dir.path().join("man1")).expect("pages written");
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        assert_eq!(names.first().map(String::as_str), Some("paywatch.1"));
        assert!(
            names.contains(&"paywatch-check-config.1".to_owned()),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains("demo-hook")), "{names:?}");
        let main = std::fs::read_to_string(&pages[0]).expect("page read");
        assert!(main.contains(".TH paywatch 1"), "no title header");
        assert!(main.contains("check\\-config"), "subcommands not listed");
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "FILES",
            "ENVIRONMENT",
            "EXIT STATUS",
            "SIGNALS",
            "SEE ALSO",
        ] {
            assert!(
                main.contains(&format!(".SH {section}")),
                "paywatch.1 has no {section} section"
            );
        }
        assert!(
            !main.contains("demo\\-hook"),
            "a hidden command in paywatch.1"
        );
        let config =
            std::fs::read_to_string(dir.path().join("man1/paywatch.toml.5")).expect("section 5");
        assert!(config.contains(".TH paywatch.toml 5"));
        for key in crate::settings::KNOWN_KEYS {
            let described = match key.split_once('.') {
                Some((section, name)) => {
                    config.contains(&format!("[{section}]")) && config.contains(name)
                }
                None => config.contains(key),
            };
            assert!(described, "paywatch.toml(5) does not describe '{key}'");
        }
    }
}
