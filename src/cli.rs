//! Command-line interface (being written).

/// Entry point of the `farpool` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
