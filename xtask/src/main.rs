//! `cargo xtask`: one command that sets a fresh Debian/Ubuntu machine up for the tests and runs
//! them (`cargo xtask test`), or only sets it up (`cargo xtask setup`, which `.ci/run` uses
//! before its other checks).

mod setup;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Sets this machine up for the tests and runs them.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Set up (see `setup`), then run the whole test suite: `cargo test --release [ARGS]`.
    ///
    /// Arguments after `--` go to `cargo test`: `cargo xtask test -- --test boot hello` runs
    /// the boot tests whose name contains "hello".
    Test {
        /// Print what would be installed and run, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Arguments passed on to `cargo test --release`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Check /dev/kvm and rustup, install the missing Debian packages and Rust toolchain
    /// pieces; run nothing.
    Setup {
        /// Print what would be installed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let help = format!(
        "Set-up, in order: /dev/kvm must open read-write and rustup must be installed (a clear error \
         otherwise); the Debian packages below are installed with apt-get when their commands are \
         missing (with sudo when not root; what is present is skipped); the toolchain, targets and \
         components of rust-toolchain.toml are installed with rustup when missing.\n\nDebian packages \
         the tests need:\n{}",
        setup::package_help()
    );
    let matches = Cli::command()
        .after_help(help.clone())
        .mut_subcommand("test", |c| c.after_help(help.clone()))
        .mut_subcommand("setup", |c| c.after_help(help.clone()))
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let root = workspace_root();
    let (dry_run, test_args) = match cli.command {
        Task::Test { dry_run, args } => (dry_run, Some(args)),
        Task::Setup { dry_run } => (dry_run, None),
    };

    let started = Instant::now();
    if let Err(e) = setup::run(&root, dry_run) {
        eprintln!("xtask: error: {e}");
        return ExitCode::FAILURE;
    }
    println!("xtask: set-up {} in {:.2} s", if dry_run { "checked" } else { "done" }, started.elapsed().as_secs_f64());

    let Some(args) = test_args else { return ExitCode::SUCCESS };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["test", "--release"]).args(&args);
    println!(
        "xtask: running {}",
        std::iter::once("cargo test --release").chain(args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    );
    if dry_run {
        println!("xtask: (dry run: not running it)");
        return ExitCode::SUCCESS;
    }
    match cmd.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("xtask: cargo test --release failed ({status})");
            // A test failure is cargo's 101; keep the code when there is one.
            ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).filter(|&c| c != 0).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("xtask: error: cannot run {}: {e}", PathBuf::from(cargo).display());
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory (cargo sets `CARGO_MANIFEST_DIR`
/// when it runs the task; the build-time value otherwise).
fn workspace_root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}
