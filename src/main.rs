//! The `farpool` command: controller, memory node, demo, bench, status.

fn main() -> std::process::ExitCode {
    farpool::cli::main()
}
