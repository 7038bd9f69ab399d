//! `chat-node` binary: parse the configuration, then serve (see the library docs).

use chat_node::config::{self, Command, USAGE};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned());
    match config::parse(args, |name| std::env::var(name).ok()) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Run(config)) => match chat_node::server::run(*config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat-node: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("chat-node: {e}\nTry 'chat-node --help'.");
            ExitCode::from(2)
        }
    }
}
