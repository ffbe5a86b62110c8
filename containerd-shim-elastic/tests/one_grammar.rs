//! The containerd shim and `hypervisor-shim` read policies and published ports with one
//! grammar (`elastic-config`): what one refuses the other refuses, with the same message, and
//! what containerd hands the VMM the VMM accepts.
//!
//! Needs no root, containerd or /dev/kvm (no VM starts), but does need `hypervisor-shim` built:
//! beside the containerd shim's binary (`target/<profile>/`), else in the other profile's
//! directory (`cargo build --release -p hypervisor-shim` or `cargo build -p hypervisor-shim`).
//! Without it the tests fail and say so; they never pass without having run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use containerd_shim_elastic::config::RootfsConfig;
use containerd_shim_elastic::spec::{SpecError, Workload, plan};
use containerd_shim_elastic::vmm::Vmm;
use elastic_config::{
    DEFAULT_MEMORY_POLICY, DEFAULT_VCPU_POLICY, parse_memory_policy, parse_publish, parse_vcpu_policy,
};

/// The containerd shim binary cargo built for these tests.
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-elastic-v1");

/// `hypervisor-shim`'s exit code for a bad flag or configuration (the README's exit-code table).
const EXIT_USAGE: i32 = 64;
/// `hypervisor-shim`'s exit code for an unreadable kernel image: it got past every flag.
const EXIT_NO_KERNEL: i32 = 66;

/// `hypervisor-shim`: beside the containerd shim, else in the other profile's directory.
fn vmm_binary() -> PathBuf {
    let dir = Path::new(SHIM).parent().expect("the shim binary has a directory");
    let candidates =
        [dir.join("hypervisor-shim"), dir.join("../release/hypervisor-shim"), dir.join("../debug/hypervisor-shim")];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "hypervisor-shim is not built (looked for {candidates:?}): run `cargo build --release -p hypervisor-shim` \
             (these tests compare its flag parsing with the containerd shim's)"
        )
    })
}

/// `hypervisor-shim ARGS`, to completion.
fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_binary()).args(args).output().expect("hypervisor-shim runs")
}

/// What an `elastic.toml` with `field = value` makes the containerd shim say.
fn containerd_error(field: &str, value: &str) -> String {
    let toml = if field == "publish" { format!("{field} = [\"{value}\"]") } else { format!("{field} = \"{value}\"") };
    let e = RootfsConfig::parse(&toml, Path::new("elastic.toml")).expect_err(&toml);
    e.to_string()
}

/// A rootfs with a kernel file and `elastic.toml`, removed on drop.
struct Rootfs(PathBuf);

impl Rootfs {
    fn new(name: &str, toml: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ctd-one-grammar-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("kernel"), b"\x7fELF").expect("kernel");
        std::fs::write(dir.join("elastic.toml"), toml).expect("toml");
        Rootfs(dir)
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The OCI spec `ctr run --rootfs` writes, reduced to what `plan` reads.
fn spec() -> oci_spec::runtime::Spec {
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "terminal": false},
        "root": {"path": "rootfs"}
    }))
    .expect("a valid spec")
}

/// The case the drift allowed: 65 vCPUs passed containerd and failed in the VMM. Now the
/// containerd shim refuses it while planning the task (Create, before any VM), and
/// `hypervisor-shim run` refuses it as a flag, with the same words.
#[test]
fn sixty_five_vcpus_are_refused_by_both() {
    let rootfs = Rootfs::new("65", "service = \"hello\"\nvcpus = \"1:65:65\"\n");
    let e = plan(&spec(), &rootfs.0).expect_err("65 vCPUs planned");
    assert!(matches!(e, SpecError::Config(_)), "{e}");
    let message = "vCPU policy 1:65:65: min must be at least 1 and burst at most 64";
    assert!(e.to_string().ends_with(&format!("vcpus: {message}")), "{e}");

    let out = vmm(&["run", "--vcpus", "1:65:65"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains(message), "{stderr}");
}

/// Bad values of every kind: both sides refuse them, and both print `elastic-config`'s message.
#[test]
fn bad_values_get_the_same_message_on_both_sides() {
    let cases = [
        ("vcpus", "1:65:65"),
        ("vcpus", "4:2:8"),
        ("vcpus", "0:1:1"),
        ("vcpus", "1:x:2"),
        ("vcpus", "1:2:3:4"),
        ("memory", "5M"),
        ("memory", "65M"),
        ("memory", "300000000"),
        ("memory", "64M:32M"),
        ("memory", "64M:64M:1000G"),
        ("memory", "1.5G"),
        ("publish", "6379"),
        ("publish", "0:80"),
        ("publish", "70000:80"),
        ("publish", "x.y:1:2"),
    ];
    for (field, value) in cases {
        let expected = match field {
            "vcpus" => parse_vcpu_policy(value).map(drop).map_err(|e| e.to_string()),
            "memory" => parse_memory_policy(value).map(drop).map_err(|e| e.to_string()),
            _ => parse_publish(value).map(drop).map_err(|e| e.to_string()),
        }
        .expect_err(value);
        let containerd = containerd_error(field, value);
        assert_eq!(containerd, format!("elastic.toml: {field}: {expected}"), "{field} = {value}");
        let out = vmm(&["run", &format!("--{field}"), value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "--{field} {value}: {stderr}");
        assert!(stderr.contains(&expected), "--{field} {value}: expected {expected:?} in {stderr}");
    }
}

/// What the containerd shim plans from the new grammar (two-value policies, `Mi`/`Gi`, IPv6,
/// large guest ports), the VMM takes: its flags pass, and it stops only at the (missing)
/// kernel.
#[test]
fn what_containerd_passes_the_vmm_accepts() {
    let rootfs = Rootfs::new(
        "accept",
        "service = \"hello\"\nvcpus = \"1:64\"\nmemory = \"64Mi:1Gi\"\n\
         publish = [\"[::1]:18080:80\", \"127.0.0.1:18081:4294967295\"]\n",
    );
    let Workload::Vm(mut vm) = plan(&spec(), &rootfs.0).expect("plan") else { panic!("a sandbox") };
    vm.kernel = PathBuf::from("/nonexistent/kernel");
    let vmm_path = vmm_binary();
    let args = Vmm { path: vmm_path.clone() }.run_args(&vm, Path::new("/nonexistent/api.sock"));
    let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert!(shown.join(" ").contains("--vcpus 1:64:64 --memory 64M:1G:1G"), "{shown:?}");
    let out = Command::new(&vmm_path).args(&args).output().expect("hypervisor-shim runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_NO_KERNEL), "{shown:?}: {stderr}");
    assert!(stderr.contains("cannot read kernel image /nonexistent/kernel"), "{stderr}");
}

/// The defaults containerd assumes when `elastic.toml` names no policy are the VMM's own.
#[test]
fn defaults_are_the_vmms() {
    let out = vmm(&["run", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    let default_of = |flag: &str| {
        let after = &help[help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("{flag} in {help}"))..];
        let start = after.find("[default: ").expect("a default") + "[default: ".len();
        after[start..start + after[start..].find(']').expect("]")].to_string()
    };
    assert_eq!(parse_vcpu_policy(&default_of("--vcpus")), Ok(DEFAULT_VCPU_POLICY));
    assert_eq!(parse_memory_policy(&default_of("--memory")), Ok(DEFAULT_MEMORY_POLICY));
}
