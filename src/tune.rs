//! `gitplane tune check`: reads the running kernel's settings (`/proc/sys`) and this process's
//! resource limits (`getrlimit`) and compares each with what a Git hosting node needs, printing
//! the current value, the recommendation, OK or LOW (HIGH where smaller is better) and the
//! command that fixes it. The same values, ready to install, are in `tuning/` (sysctl profile,
//! limits, systemd unit); this module and `tuning/sysctl.d/90-gitplane.conf` must agree, and a
//! test checks that they do.

use std::fmt::Write as _;
use std::path::Path;

/// How a value is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// At least this much.
    AtLeast(u64),
    /// At most this much (keepalive timers: shorter finds dead peers sooner).
    AtMost(u64),
    /// At least this much, or 0, which the kernel reads as "no limit".
    AtLeastOrZero(u64),
    /// The third of three numbers (`min default max`) at least this much.
    MaxOfTripleAtLeast(u64),
    /// `low high` with at least this many ports in between.
    PortSpanAtLeast(u64),
}

/// Where a value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A sysctl, as its dotted name (`net.core.somaxconn` is `/proc/sys/net/core/somaxconn`).
    Sysctl,
    /// A soft resource limit of this process (`ulimit`), with the `libc` resource number.
    Rlimit(i32),
}

/// One setting the node should have.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub source: Source,
    pub want: Want,
    /// The value to set (what `tuning/` installs), as the kernel writes it.
    pub recommended: &'static str,
    pub why: &'static str,
}

const MIB: u64 = 1 << 20;

/// Every setting checked, in the order printed.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "net.core.somaxconn",
        source: Source::Sysctl,
        want: Want::AtLeast(4096),
        recommended: "65535",
        why: "accept backlog cap: a burst of CI clones must queue, not get RSTs",
    },
    Setting {
        name: "net.ipv4.tcp_max_syn_backlog",
        source: Source::Sysctl,
        want: Want::AtLeast(8192),
        recommended: "65535",
        why: "half-open connections held during a connection burst",
    },
    Setting {
        name: "net.core.netdev_max_backlog",
        source: Source::Sysctl,
        want: Want::AtLeast(16384),
        recommended: "65536",
        why: "packets queued per CPU before the stack drops them at line rate",
    },
    Setting {
        name: "net.ipv4.ip_local_port_range",
        source: Source::Sysctl,
        want: Want::PortSpanAtLeast(50000),
        recommended: "10000 65535",
        why: "outgoing ports (S3, webhooks, RabbitMQ, load generators on the node)",
    },
    Setting {
        name: "net.ipv4.tcp_keepalive_time",
        source: Source::Sysctl,
        want: Want::AtMost(600),
        recommended: "300",
        why: "dead idle peers are found in minutes, not 2 hours (gitplane also sets it per socket)",
    },
    Setting {
        name: "net.ipv4.tcp_keepalive_intvl",
        source: Source::Sysctl,
        want: Want::AtMost(75),
        recommended: "30",
        why: "interval between keepalive probes",
    },
    Setting {
        name: "net.ipv4.tcp_keepalive_probes",
        source: Source::Sysctl,
        want: Want::AtMost(9),
        recommended: "5",
        why: "probes before a silent peer is dropped",
    },
    Setting {
        name: "net.core.rmem_max",
        source: Source::Sysctl,
        want: Want::AtLeast(16 * MIB),
        recommended: "16777216",
        why: "largest receive buffer: large pushes over long, fat links",
    },
    Setting {
        name: "net.core.wmem_max",
        source: Source::Sysctl,
        want: Want::AtLeast(16 * MIB),
        recommended: "16777216",
        why: "largest send buffer: clones stream packs out",
    },
    Setting {
        name: "net.ipv4.tcp_rmem",
        source: Source::Sysctl,
        want: Want::MaxOfTripleAtLeast(16 * MIB),
        recommended: "4096 131072 16777216",
        why: "TCP receive autotuning ceiling",
    },
    Setting {
        name: "net.ipv4.tcp_wmem",
        source: Source::Sysctl,
        want: Want::MaxOfTripleAtLeast(16 * MIB),
        recommended: "4096 131072 16777216",
        why: "TCP send autotuning ceiling",
    },
    Setting {
        name: "fs.file-max",
        source: Source::Sysctl,
        want: Want::AtLeast(2 * MIB),
        recommended: "4194304",
        why: "system-wide open files: each clone holds a socket, pipes and git's files",
    },
    Setting {
        name: "fs.nr_open",
        source: Source::Sysctl,
        want: Want::AtLeast(MIB),
        recommended: "1048576",
        why: "ceiling for a process's nofile limit (LimitNOFILE cannot exceed it)",
    },
    Setting {
        name: "fs.pipe-max-size",
        source: Source::Sysctl,
        want: Want::AtLeast(MIB),
        recommended: "1048576",
        why: "gitplane enlarges git's stdout pipe to 1 MiB for splice (F_SETPIPE_SZ)",
    },
    Setting {
        name: "fs.pipe-user-pages-soft",
        source: Source::Sysctl,
        want: Want::AtLeastOrZero(262_144),
        recommended: "0",
        why: "per-user pipe pages: past it (default 64 MiB = 64 one-MiB pipes) new pipes \
              shrink to one page and splice crawls; 0 = no limit",
    },
    Setting {
        name: "RLIMIT_NOFILE",
        source: Source::Rlimit(libc::RLIMIT_NOFILE as i32),
        want: Want::AtLeast(262_144),
        recommended: "1048576",
        why: "open files of the gitplane process (sockets, pipes, git children's fds)",
    },
    Setting {
        name: "RLIMIT_MEMLOCK",
        source: Source::Rlimit(libc::RLIMIT_MEMLOCK as i32),
        want: Want::AtLeast(256 * MIB),
        recommended: "unlimited",
        why: "locked memory for io_uring rings (kernels < 5.12) and the pinned LFS buffer pool",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Low,
    High,
    /// Not readable here (a missing sysctl, e.g. in a container).
    Unknown,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Low => "LOW",
            Status::High => "HIGH",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// The verdict on one setting.
#[derive(Debug, Clone)]
pub struct Finding {
    pub setting: &'static Setting,
    pub current: String,
    pub status: Status,
}

impl Finding {
    /// The command that sets the recommended value now (persist it with `tuning/`).
    pub fn fix(&self) -> String {
        let s = self.setting;
        match s.source {
            Source::Sysctl => format!("sysctl -w {}=\"{}\"", s.name, s.recommended),
            Source::Rlimit(r) if r == libc::RLIMIT_NOFILE as i32 => format!(
                "ulimit -n {} (systemd: LimitNOFILE={})",
                s.recommended, s.recommended
            ),
            Source::Rlimit(_) => format!(
                "ulimit -l {} (systemd: LimitMEMLOCK=infinity)",
                s.recommended
            ),
        }
    }
}

/// "unlimited" for `RLIM_INFINITY`, the number otherwise.
fn show_limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Judges `raw` (as the kernel prints it) against `want`.
pub fn judge(want: Want, raw: &str) -> Status {
    let nums: Vec<u64> = raw
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let first = nums.first().copied();
    let ok = match (want, first) {
        (_, None) => return Status::Unknown,
        (Want::AtLeast(min), Some(v)) => v >= min,
        (Want::AtMost(max), Some(v)) => {
            return if v <= max { Status::Ok } else { Status::High };
        }
        (Want::AtLeastOrZero(min), Some(v)) => v == 0 || v >= min,
        (Want::MaxOfTripleAtLeast(min), Some(_)) => nums.get(2).is_some_and(|&v| v >= min),
        (Want::PortSpanAtLeast(span), Some(lo)) => nums
            .get(1)
            .is_some_and(|&hi| hi.saturating_sub(lo) + 1 >= span),
    };
    if ok {
        Status::Ok
    } else {
        Status::Low
    }
}

/// Checks every setting, reading sysctls under `proc_sys` (normally `/proc/sys`) and limits
/// with `rlimit` (normally [`soft_rlimit`]).
pub fn check_with(proc_sys: &Path, rlimit: impl Fn(i32) -> Option<u64>) -> Vec<Finding> {
    SETTINGS
        .iter()
        .map(|s| {
            let current = match s.source {
                Source::Sysctl => {
                    let path = proc_sys.join(s.name.replace('.', "/"));
                    std::fs::read_to_string(path)
                        .ok()
                        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                }
                Source::Rlimit(r) => rlimit(r).map(show_limit),
            };
            match current {
                Some(c) => {
                    // RLIM_INFINITY is u64::MAX, which `judge` parses back as a huge number.
                    let raw = if c == "unlimited" {
                        u64::MAX.to_string()
                    } else {
                        c.clone()
                    };
                    Finding {
                        setting: s,
                        status: judge(s.want, &raw),
                        current: c,
                    }
                }
                None => Finding {
                    setting: s,
                    current: "unreadable".into(),
                    status: Status::Unknown,
                },
            }
        })
        .collect()
}

/// This process's soft limit for `resource`.
// `rlim_t` is u64 on 64-bit Linux but u32 on some 32-bit targets: keep the conversion.
#[allow(clippy::useless_conversion)]
pub fn soft_rlimit(resource: i32) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // The resource type differs between libc targets (u32 on glibc); the values are tiny.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let res = resource as _;
    // SAFETY: getrlimit writes one rlimit struct that we own.
    let rc = unsafe { libc::getrlimit(res, &mut lim) };
    (rc == 0).then_some(u64::from(lim.rlim_cur))
}

/// Checks the running kernel and this process.
pub fn check() -> Vec<Finding> {
    check_with(Path::new("/proc/sys"), soft_rlimit)
}

/// The report `gitplane tune check` prints.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<30} {:<24} {:<24} {:<7} fix",
        "setting", "current", "recommended", "status"
    );
    for f in findings {
        let _ = writeln!(
            out,
            "{:<30} {:<24} {:<24} {:<7} {}",
            f.setting.name,
            f.current,
            f.setting.recommended,
            f.status.label(),
            if f.status == Status::Ok {
                String::from("-")
            } else {
                f.fix()
            }
        );
    }
    let bad = findings.iter().filter(|f| f.status != Status::Ok).count();
    if bad == 0 {
        let _ = writeln!(out, "\nall {} settings OK", findings.len());
    } else {
        let _ = writeln!(
            out,
            "\n{bad} of {} settings need attention; to persist them: install \
             tuning/sysctl.d/90-gitplane.conf and tuning/limits.d/90-gitplane.conf, or run \
             under tuning/gitplane.service (see tuning/README.md)",
            findings.len()
        );
        for f in findings.iter().filter(|f| f.status != Status::Ok) {
            let _ = writeln!(out, "  {}: {}", f.setting.name, f.setting.why);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_each_kind() {
        assert_eq!(judge(Want::AtLeast(10), "10"), Status::Ok);
        assert_eq!(judge(Want::AtLeast(10), "9"), Status::Low);
        assert_eq!(judge(Want::AtMost(600), "7200"), Status::High);
        assert_eq!(judge(Want::AtLeastOrZero(5), "0"), Status::Ok);
        assert_eq!(judge(Want::AtLeastOrZero(5), "4"), Status::Low);
        assert_eq!(judge(Want::MaxOfTripleAtLeast(100), "1 2 100"), Status::Ok);
        assert_eq!(
            judge(Want::MaxOfTripleAtLeast(100), "1 200 99"),
            Status::Low
        );
        assert_eq!(
            judge(Want::PortSpanAtLeast(50000), "32768\t60999"),
            Status::Low
        );
        assert_eq!(
            judge(Want::PortSpanAtLeast(50000), "10000 65535"),
            Status::Ok
        );
        assert_eq!(judge(Want::AtLeast(1), "garbage"), Status::Unknown);
    }

    #[test]
    fn recommendations_satisfy_their_own_checks() {
        for s in SETTINGS {
            let raw = if s.recommended == "unlimited" {
                u64::MAX.to_string()
            } else {
                s.recommended.to_owned()
            };
            assert_eq!(judge(s.want, &raw), Status::Ok, "{}", s.name);
        }
    }

    #[test]
    fn reads_a_fake_proc_sys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("net/core");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("somaxconn"), "128\n").unwrap();
        let findings = check_with(dir.path(), |_| Some(1024));
        let by = |n: &str| findings.iter().find(|f| f.setting.name == n).unwrap();
        assert_eq!(by("net.core.somaxconn").status, Status::Low);
        assert_eq!(by("net.core.somaxconn").current, "128");
        assert_eq!(by("fs.file-max").status, Status::Unknown);
        assert_eq!(by("RLIMIT_NOFILE").status, Status::Low);
        let text = render(&findings);
        assert!(text.contains("sysctl -w net.core.somaxconn=\"65535\""));
        assert!(text.contains("ulimit -n 1048576"));
    }

    /// The shipped sysctl profile sets exactly the recommended values.
    #[test]
    fn sysctl_profile_agrees() {
        let conf = include_str!("../tuning/sysctl.d/90-gitplane.conf");
        for s in SETTINGS.iter().filter(|s| s.source == Source::Sysctl) {
            let line = conf
                .lines()
                .find(|l| l.split('=').next().map(str::trim) == Some(s.name))
                .unwrap_or_else(|| panic!("{} missing from the sysctl profile", s.name));
            let value = line.split_once('=').unwrap().1.trim();
            let norm = |v: &str| v.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(norm(value), norm(s.recommended), "{}", s.name);
        }
    }
}
