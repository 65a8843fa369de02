//! The `paywatch` binary: parse the command line, run it, and choose the exit code.

use std::process::ExitCode;

use clap::Parser;
use paywatch::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("paywatch: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Under journald, give the fatal error its syslog priority (err) like every log line.
            let priority = if paywatch::logging::stderr_is_journal() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{priority}paywatch: {error:#}");
            cli::exit_code(&error)
        }
    }
}
