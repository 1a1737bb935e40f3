//! The `pacloud-lambda` function binary; everything is in the library.

fn main() -> std::process::ExitCode {
    pacloud_lambda::main()
}
