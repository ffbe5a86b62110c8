//! `elastic.toml`: what a rootfs runs when the OCI spec does not say otherwise.
//!
//! ```toml
//! service = "kv"                     # the service in the kernel image (required)
//! args = ["--some", "arg"]           # its arguments (default none)
//! kernel = "kernel"                  # kernel ELF, relative to the rootfs (default "kernel")
//! vcpus = "1:2:4"                    # default vCPU policy MIN:MAX:BURST
//! memory = "64M:256M:512M"           # default memory policy MIN:MAX:BURST
//! publish = ["127.0.0.1:6379:6379"]  # default published ports [ADDR:]HOST_PORT:GUEST_PORT
//! log = "info"                       # guest log level
//! ```
//!
//! `vcpus`, `memory` and `publish` are read with [`elastic_config`], the grammar and limits of
//! `hypervisor-shim run --vcpus/--memory/--publish`: a value the VMM would refuse is refused
//! here, with the VMM's message, before any VM starts.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use elastic_config::{
    DEFAULT_MEMORY_POLICY, DEFAULT_VCPU_POLICY, Policy, Publish, parse_memory_policy, parse_publish, parse_vcpu_policy,
};

/// The file name looked up at the root of the rootfs.
pub const FILE_NAME: &str = "elastic.toml";

/// A problem with `elastic.toml`.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field has a value that does not parse.
    #[error("{path}: {field}: {source}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// Why.
        source: elastic_config::Error,
    },
    /// `kernel` escapes the rootfs or is empty.
    #[error("{path}: kernel = {kernel:?} must be a relative path inside the rootfs")]
    KernelPath {
        /// The file.
        path: PathBuf,
        /// The value.
        kernel: String,
    },
    /// `log` is not a level the guest knows.
    #[error("{path}: log = {level:?} is not one of off, error, warn, info, debug, trace")]
    LogLevel {
        /// The file.
        path: PathBuf,
        /// The value.
        level: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    service: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    kernel: Option<String>,
    vcpus: Option<String>,
    memory: Option<String>,
    #[serde(default)]
    publish: Vec<String>,
    log: Option<String>,
}

/// The rootfs's defaults, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RootfsConfig {
    /// Service to start when the OCI process has no args.
    pub service: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Kernel ELF, relative to the rootfs.
    pub kernel: PathBuf,
    /// Default vCPU policy ([`DEFAULT_VCPU_POLICY`] when not given).
    pub vcpus: Policy,
    /// Default memory policy ([`DEFAULT_MEMORY_POLICY`] when not given).
    pub memory: Policy,
    /// Default published ports.
    pub publish: Vec<Publish>,
    /// Guest log level.
    pub log: String,
}

impl RootfsConfig {
    /// Reads `elastic.toml` from the root of `rootfs`.
    pub fn load(rootfs: &Path) -> Result<Self, ConfigError> {
        let path = rootfs.join(FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        Self::parse(&text, &path)
    }

    /// Parses the text of an `elastic.toml` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: path.into(), message: one_line(&e) })?;
        let field = |field: &'static str, source: elastic_config::Error| ConfigError::Field {
            path: path.into(),
            field,
            source,
        };
        let kernel = raw.kernel.unwrap_or_else(|| "kernel".to_string());
        let kernel_path = PathBuf::from(&kernel);
        if kernel.is_empty() || !kernel_path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ConfigError::KernelPath { path: path.into(), kernel });
        }
        let log = raw.log.unwrap_or_else(|| "info".to_string());
        if !hypercall_abi::LOG_LEVELS.contains(&log.as_str()) {
            return Err(ConfigError::LogLevel { path: path.into(), level: log });
        }
        Ok(RootfsConfig {
            service: raw.service,
            args: raw.args,
            kernel: kernel_path,
            vcpus: match raw.vcpus.as_deref() {
                Some(text) => parse_vcpu_policy(text).map_err(|e| field("vcpus", e.into()))?,
                None => DEFAULT_VCPU_POLICY,
            },
            memory: match raw.memory.as_deref() {
                Some(text) => parse_memory_policy(text).map_err(|e| field("memory", e.into()))?,
                None => DEFAULT_MEMORY_POLICY,
            },
            publish: raw
                .publish
                .iter()
                .map(|p| parse_publish(p))
                .collect::<Result<_, _>>()
                .map_err(|e| field("publish", e.into()))?,
            log,
        })
    }
}

/// The first line of a TOML error (the rest is a source excerpt).
fn one_line(e: &toml::de::Error) -> String {
    e.message().lines().next().unwrap_or("invalid TOML").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RootfsConfig, ConfigError> {
        RootfsConfig::parse(text, Path::new("elastic.toml"))
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let c = parse("service = \"hello\"").expect("valid");
        assert_eq!(c.service.as_deref(), Some("hello"));
        assert_eq!(c.kernel, PathBuf::from("kernel"));
        assert_eq!(c.vcpus, Policy::fixed(1));
        assert_eq!(c.memory, Policy::fixed(64 << 20));
        assert_eq!(c.log, "info");
        assert!(c.args.is_empty() && c.publish.is_empty());
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            "service = \"kv\"\nargs = [\"a\", \"b\"]\nkernel = \"boot/kernel\"\nvcpus = \"1:2:4\"\n\
             memory = \"64M:256M:512M\"\npublish = [\"6379:6379\"]\nlog = \"warn\"",
        )
        .expect("valid");
        assert_eq!(c.args, ["a", "b"]);
        assert_eq!(c.kernel, PathBuf::from("boot/kernel"));
        assert_eq!(c.vcpus, Policy { min: 1, max: 2, burst: 4 });
        assert_eq!(c.memory, Policy { min: 64 << 20, max: 256 << 20, burst: 512 << 20 });
        assert_eq!(c.publish[0].canonical(), "127.0.0.1:6379:6379");
    }

    #[test]
    fn bad_files_name_the_problem() {
        let e = parse("service = \"x\"\nsurprise = 1").expect_err("unknown field");
        assert!(e.to_string().contains("surprise"), "{e}");
        let e = parse("vcpus = \"4:2:1\"").expect_err("unordered");
        assert!(e.to_string().contains("vcpus"), "{e}");
        let e = parse("kernel = \"../../etc/passwd\"").expect_err("escapes");
        assert!(e.to_string().contains("inside the rootfs"), "{e}");
        let e = parse("kernel = \"/kernel\"").expect_err("absolute");
        assert!(e.to_string().contains("inside the rootfs"), "{e}");
        let e = parse("log = \"loud\"").expect_err("level");
        assert!(e.to_string().contains("loud"), "{e}");
    }

    /// The shim's grammar, not a lookalike: two-value policies and `Mi`/`Gi` sizes parse, IPv6
    /// publishes parse; 65 vCPUs, misaligned memory and 0 ports are refused with the shim's
    /// messages.
    #[test]
    fn values_follow_the_shims_grammar() {
        let c = parse("vcpus = \"1:2\"\nmemory = \"64Mi:1Gi\"\npublish = [\"[::1]:8080:4294967295\"]").expect("valid");
        assert_eq!(c.vcpus, Policy { min: 1, max: 2, burst: 2 });
        assert_eq!(c.memory, Policy { min: 64 << 20, max: 1 << 30, burst: 1 << 30 });
        assert_eq!(c.publish[0].canonical(), "[::1]:8080:4294967295");
        for (toml, message) in [
            ("vcpus = \"1:65:65\"", "vcpus: vCPU policy 1:65:65: min must be at least 1 and burst at most 64"),
            ("vcpus = \"4:2:1\"", "vcpus: vCPU policy 4:2:1 must satisfy min <= max <= burst"),
            ("memory = \"300000000\"", "memory: memory policy 300000000: 300000000 is not a multiple of 2M"),
            ("memory = \"5M\"", "memory: memory policy 5M: min must be at least 8M"),
            ("publish = [\"0:80\"]", "publish: '0:80': ports are 1-65535 on the host and 1-4294967295 in the guest"),
        ] {
            let e = parse(toml).expect_err(toml);
            assert_eq!(e.to_string(), format!("elastic.toml: {message}"), "{toml}");
        }
    }
}
