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

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "paywatch", &mut script);
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

/// Writes the man pages (section 1) into `dir`; returns their paths, `paywatch.1` first.
///
/// # Errors
///
/// The directory cannot be created or a page cannot be written.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory '{}'", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into '{}'", dir.display()))?;
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
    }
}
