//! The machine set-up: check /dev/kvm and rustup, install the Debian packages whose commands
//! are missing, and the toolchain pieces `rust-toolchain.toml` names.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// A Debian package the tests need, the commands that show it is present, and why.
#[derive(Debug)]
struct Package {
    name: &'static str,
    commands: &'static [&'static str],
    why: &'static str,
}

/// What the tests run besides the shim (`.ci/run` used to install the same list).
const PACKAGES: &[Package] = &[
    Package {
        name: "qemu-system-x86",
        commands: &["qemu-system-x86_64"],
        why: "the QEMU boot path (tests/boot.rs boots the same kernel under QEMU)",
    },
    Package {
        name: "redis-tools",
        commands: &["redis-cli", "redis-benchmark"],
        why: "unmodified Redis clients that drive the kv service",
    },
    Package { name: "redis-server", commands: &["redis-server"], why: "the native anchor next to the kv service" },
    Package { name: "wrk", commands: &["wrk"], why: "load on the http service" },
    Package { name: "curl", commands: &["curl"], why: "requests to the http service" },
    Package {
        name: "netcat-openbsd",
        commands: &["nc"],
        why: "README's half-close example (`nc -N`) against the kv service (tests/kv_redis.rs)",
    },
    Package {
        name: "nginx-light",
        commands: &["nginx"],
        why: "the http service's native anchor in `bench` (/usr/sbin/nginx)",
    },
    Package {
        name: "containerd",
        commands: &["containerd", "ctr"],
        why: "the containerd shim's tests run a real containerd",
    },
    Package { name: "runc", commands: &["runc"], why: "containerd needs it to start" },
    Package { name: "procps", commands: &["ps"], why: "tests list processes to check none is left behind" },
    Package {
        name: "strace",
        commands: &["strace"],
        why: "tests/builtin_kernel.rs checks a copied binary opens nothing in target/",
    },
    Package {
        name: "iproute2",
        commands: &["ip"],
        why: "tests/migration.rs and `bench` migrate over TCP between two network namespaces they make",
    },
];

/// Where commands are looked for besides `PATH` (nginx is in /usr/sbin, which is not on every
/// user's `PATH`).
const SBIN: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Why the set-up stopped.
#[derive(Debug, Error)]
pub(crate) enum SetupError {
    #[error(
        "/dev/kvm does not exist: the tests boot real VMs on KVM; use a machine with KVM (load kvm_intel or kvm_amd, or enable nested virtualization)"
    )]
    NoKvm,
    #[error(
        "/dev/kvm cannot be opened read-write by this user: add yourself to its group (sudo usermod -aG kvm $USER, then log in again) or run as root"
    )]
    KvmDenied,
    #[error("/dev/kvm cannot be opened: {0}")]
    Kvm(io::Error),
    #[error(
        "rustup is not installed: the build installs the kernel's target with it; install it from https://rustup.rs"
    )]
    NoRustup,
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: std::process::ExitStatus },
    #[error("cannot read {path}: {message}")]
    ToolchainFile { path: PathBuf, message: String },
    #[error(
        "these Debian packages are missing and apt-get is not available: {0}; install them with this system's package manager"
    )]
    NoAptGet(String),
    #[error("these Debian packages are missing: {0}; this user is not root and sudo is not installed: run as root")]
    NoSudo(String),
    #[error("after installing {package}, `{command}` is still not found")]
    StillMissing { package: &'static str, command: &'static str },
}

/// One line per package for `--help`.
pub(crate) fn package_help() -> String {
    PACKAGES.iter().map(|p| format!("  {:<16} {}", p.name, p.why)).collect::<Vec<_>>().join("\n")
}

/// Runs the whole set-up (or, with `dry_run`, says what it would do).
pub(crate) fn run(root: &Path, dry_run: bool) -> Result<(), SetupError> {
    check_kvm()?;
    println!("xtask: /dev/kvm opens read-write");
    check_rustup()?;
    packages(dry_run)?;
    toolchain(root, dry_run)
}

fn check_kvm() -> Result<(), SetupError> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SetupError::NoKvm),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(SetupError::KvmDenied),
        Err(e) => Err(SetupError::Kvm(e)),
    }
}

fn check_rustup() -> Result<(), SetupError> {
    match Command::new("rustup").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(_) => Err(SetupError::NoRustup),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SetupError::NoRustup),
        Err(source) => Err(SetupError::Spawn { program: "rustup".into(), source }),
    }
}

/// `PATH` followed by the sbin directories.
fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(SBIN.iter().map(PathBuf::from));
    std::env::join_paths(dirs).unwrap_or_default()
}

fn present(command: &str, path: &OsString) -> bool {
    which::which_in_global(command, Some(path)).is_ok_and(|mut found| found.next().is_some())
}

/// The packages of which some command is not found on `path`.
fn missing(path: &OsString) -> Vec<&'static Package> {
    PACKAGES.iter().filter(|p| !p.commands.iter().all(|c| present(c, path))).collect()
}

/// Installs the packages whose commands are missing.
fn packages(dry_run: bool) -> Result<(), SetupError> {
    let path = search_path();
    let missing = missing(&path);
    if missing.is_empty() {
        println!("xtask: Debian packages: all {} present", PACKAGES.len());
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let list = names.join(" ");
    println!("xtask: Debian packages to install:");
    for p in &missing {
        println!("  {:<16} {}", p.name, p.why);
    }
    let apt_get = which::which_in("apt-get", Some(&path), "/").map_err(|_| SetupError::NoAptGet(list.clone()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let sudo = if root {
        None
    } else {
        Some(which::which_in("sudo", Some(&path), "/").map_err(|_| SetupError::NoSudo(list.clone()))?)
    };
    let apt = |args: &[&str]| {
        let mut cmd = match &sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg("DEBIAN_FRONTEND=noninteractive").arg(&apt_get);
                c
            }
            None => {
                let mut c = Command::new(&apt_get);
                c.env("DEBIAN_FRONTEND", "noninteractive");
                c
            }
        };
        cmd.args(args);
        cmd
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&names);
    let steps = [apt(&["update", "-q"]), apt(&install)];
    if dry_run {
        for s in &steps {
            println!("xtask: would run: {}", shown(s));
        }
        return Ok(());
    }
    if sudo.is_some() {
        println!("xtask: not root: installing with sudo (it may ask for your password)");
    }
    for mut s in steps {
        run_checked(&mut s)?;
    }
    for p in &missing {
        if let Some(command) = p.commands.iter().find(|c| !present(c, &path)) {
            return Err(SetupError::StillMissing { package: p.name, command });
        }
    }
    Ok(())
}

/// The toolchain `rust-toolchain.toml` pins, with the targets and components it lists.
#[derive(Debug)]
struct Toolchain {
    channel: String,
    targets: Vec<String>,
    components: Vec<String>,
}

fn read_toolchain(root: &Path) -> Result<Toolchain, SetupError> {
    let path = root.join("rust-toolchain.toml");
    let bad = |message: String| SetupError::ToolchainFile { path: path.clone(), message };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
    let section = table.get("toolchain").and_then(toml::Value::as_table).ok_or_else(|| bad("no [toolchain]".into()))?;
    let list = |key: &str| -> Vec<String> {
        section
            .get(key)
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let channel = section.get("channel").and_then(toml::Value::as_str).ok_or_else(|| bad("no channel".into()))?;
    Ok(Toolchain { channel: channel.to_string(), targets: list("targets"), components: list("components") })
}

/// Lines `rustup` prints for `args`.
fn rustup_lines(args: &[&str]) -> Result<Vec<String>, SetupError> {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    let out = cmd.output().map_err(|source| SetupError::Spawn { program: "rustup".into(), source })?;
    if !out.status.success() {
        return Err(SetupError::Failed { command: shown(&cmd), status: out.status });
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).collect())
}

/// Installs the pinned toolchain, or the targets and components it lacks.
fn toolchain(root: &Path, dry_run: bool) -> Result<(), SetupError> {
    let t = read_toolchain(root)?;
    let installed = rustup_lines(&["toolchain", "list"])?;
    let has_toolchain =
        installed.iter().any(|l| l.split_whitespace().next().is_some_and(|n| n.starts_with(&t.channel)));
    let mut steps = Vec::new();
    if has_toolchain {
        let targets = rustup_lines(&["target", "list", "--installed", "--toolchain", &t.channel])?;
        let components = rustup_lines(&["component", "list", "--installed", "--toolchain", &t.channel])?;
        let missing_targets: Vec<&String> = t.targets.iter().filter(|x| !targets.contains(x)).collect();
        // Installed components are listed with their host triple (`clippy-x86_64-unknown-linux-gnu`).
        let missing_components: Vec<&String> = t
            .components
            .iter()
            .filter(|c| !components.iter().any(|l| l == *c || l.starts_with(&format!("{c}-"))))
            .collect();
        if !missing_targets.is_empty() {
            let mut cmd = Command::new("rustup");
            cmd.args(["target", "add", "--toolchain", &t.channel]).args(&missing_targets);
            steps.push(cmd);
        }
        if !missing_components.is_empty() {
            let mut cmd = Command::new("rustup");
            cmd.args(["component", "add", "--toolchain", &t.channel]).args(&missing_components);
            steps.push(cmd);
        }
    } else {
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", &t.channel, "--profile", "minimal"]);
        if !t.components.is_empty() {
            cmd.args(["--component", &t.components.join(",")]);
        }
        if !t.targets.is_empty() {
            cmd.args(["--target", &t.targets.join(",")]);
        }
        steps.push(cmd);
    }
    let pieces = [vec![t.channel.clone()], t.targets.clone(), t.components.clone()].concat().join(", ");
    if steps.is_empty() {
        println!("xtask: Rust toolchain: all present ({pieces})");
        return Ok(());
    }
    for mut s in steps {
        if dry_run {
            println!("xtask: would run: {}", shown(&s));
        } else {
            println!("xtask: installing Rust toolchain pieces: {}", shown(&s));
            run_checked(&mut s)?;
        }
    }
    Ok(())
}

/// A command as it would be typed.
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn run_checked(cmd: &mut Command) -> Result<(), SetupError> {
    let status = cmd
        .status()
        .map_err(|source| SetupError::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source })?;
    if status.success() { Ok(()) } else { Err(SetupError::Failed { command: shown(cmd), status }) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn reads_the_pinned_toolchain_of_this_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let t = read_toolchain(root).unwrap();
        assert_eq!(t.channel, "1.95.0");
        assert_eq!(t.targets, ["x86_64-unknown-none"]);
        assert_eq!(t.components, ["clippy", "rustfmt"]);
        let e = read_toolchain(&root.join("no-such-dir")).unwrap_err();
        assert!(e.to_string().contains("rust-toolchain.toml"), "{e}");
    }

    #[test]
    fn a_package_is_present_only_when_all_its_commands_are() {
        let dir = std::env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = OsString::from(&dir);
        assert_eq!(missing(&path).len(), PACKAGES.len(), "an empty directory has none");
        for c in PACKAGES.iter().flat_map(|p| p.commands) {
            let f = dir.join(c);
            std::fs::write(&f, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert!(missing(&path).is_empty());
        // A file that is not executable is not a command.
        std::fs::set_permissions(dir.join("redis-benchmark"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let names: Vec<&str> = missing(&path).iter().map(|p| p.name).collect();
        assert_eq!(names, ["redis-tools"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands_print_as_typed() {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "wrk"]);
        assert_eq!(shown(&c), "apt-get install -y wrk");
    }
}
