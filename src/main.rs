//! The `xrayglm` binary: parse the command line and dispatch (src/cli/).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
