use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    steer::cli::Cli::parse().run()
}
