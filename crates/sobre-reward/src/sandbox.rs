//! Run an untrusted program so it can never stall or kill the trainer.
//!
//! Each [`Sandbox::run`] starts one child process in a fresh temporary directory (its cwd) with an
//! empty environment (plus a minimal `PATH`), in a new session and process group, under resource
//! limits, and reads its output with caps. On Linux it also puts the child, as far as the kernel
//! allows (measured once per process by a probe, see [`Support`]):
//!
//! - in a new **network** namespace (no interfaces but a down loopback: no network at all);
//! - in a new **PID** namespace, as its PID 1, so that when it dies every process it started dies
//!   with it (even those that called `setsid`), and it cannot see or signal any process outside;
//! - in a new **mount** namespace where every mount is read-only and `nosuid`, `/proc` is a fresh
//!   procfs of the new PID namespace, and the cwd is a private, size-limited tmpfs (the program's
//!   files are written into it): nothing it writes is visible outside or survives it;
//! - when the trainer runs as root: under an unprivileged uid/gid of its own (unique per run), so
//!   `RLIMIT_NPROC` applies (the kernel ignores it for root), it owns no file and cannot signal
//!   another process; when not root: in a new **user** namespace (uid mapped to itself), which
//!   is what lets an unprivileged user create the other namespaces, and in which `RLIMIT_NPROC`
//!   counts the sandbox's own processes only.
//!
//! Limits ([`Limits`]): wall clock (the whole process group is killed), CPU time (`RLIMIT_CPU`),
//! address space (`RLIMIT_AS`), processes (`RLIMIT_NPROC`), file size (`RLIMIT_FSIZE`), open
//! files (`RLIMIT_NOFILE`), no core dumps, and caps on stdout/stderr (the child is killed when it
//! writes past them). A parent-death signal kills the child if the trainer dies.
//!
//! Everything done in the child between `fork` and `exec` is a plain system call on memory
//! prepared before the fork (async-signal-safe). On other operating systems this module compiles
//! and [`Sandbox::new`] returns [`SandboxError::Unsupported`].

use serde::Serialize;
use std::time::Duration;

/// Resource limits of one run. `None` leaves a limit unset.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time, after which the whole process group is killed.
    pub wall_time: Duration,
    /// CPU time (`RLIMIT_CPU`, rounded up to whole seconds; SIGXCPU, then SIGKILL a second later).
    pub cpu_time: Option<Duration>,
    /// Address space (`RLIMIT_AS`), bytes.
    pub memory_bytes: Option<u64>,
    /// Processes (`RLIMIT_NPROC`): the process itself counts as one.
    pub processes: Option<u64>,
    /// Largest file the program may write (`RLIMIT_FSIZE`), bytes.
    pub file_size_bytes: Option<u64>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Size of the private tmpfs cwd (when the mount namespace is available), bytes.
    pub disk_bytes: u64,
    /// Stdout kept; writing more kills the program ([`Status::OutputLimit`]).
    pub stdout_bytes: usize,
    /// Stderr kept; writing more kills the program ([`Status::OutputLimit`]).
    pub stderr_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_time: Duration::from_secs(10),
            cpu_time: Some(Duration::from_secs(10)),
            memory_bytes: Some(1 << 30),
            processes: Some(64),
            file_size_bytes: Some(16 << 20),
            open_files: Some(256),
            disk_bytes: 64 << 20,
            stdout_bytes: 16 << 20,
            stderr_bytes: 64 << 10,
        }
    }
}

/// What a sandbox should attempt beyond the limits; each is applied only where [`Support`] says
/// the kernel allows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// A new network namespace.
    pub network: bool,
    /// A new PID namespace.
    pub pid: bool,
    /// A new mount namespace: read-only filesystem, private tmpfs cwd, fresh `/proc`.
    pub filesystem: bool,
    /// As root: run under an unprivileged uid of its own.
    pub drop_privileges: bool,
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation {
            network: true,
            pid: true,
            filesystem: true,
            drop_privileges: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (not one of the limits below).
    Signaled(i32),
    /// Ran past the wall-clock limit and was killed.
    WallTimeout,
    /// Hit the CPU-time limit (SIGXCPU).
    CpuTimeLimit,
    /// Wrote a file past the file-size limit (SIGXFSZ).
    FileSizeLimit,
    /// Wrote more than the stdout or stderr cap and was killed.
    OutputLimit,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Stdout, at most `Limits::stdout_bytes`.
    pub stdout: Vec<u8>,
    /// Stderr, at most `Limits::stderr_bytes`.
    pub stderr: Vec<u8>,
    /// Wall-clock time from spawn to exit.
    pub wall: Duration,
}

impl Outcome {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }

    /// The last `n` bytes of stderr as (lossy) text.
    pub fn stderr_tail(&self, n: usize) -> String {
        let start = self.stderr.len().saturating_sub(n);
        String::from_utf8_lossy(&self.stderr[start..]).into_owned()
    }
}

/// What the kernel allowed, measured once per process by spawning `/bin/sh -c 'exit 0'` under
/// progressively weaker settings until one works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Support {
    /// The trainer runs as root (euid 0).
    pub root: bool,
    /// A user namespace is created (the non-root way to get the others).
    pub user_namespace: bool,
    pub network_namespace: bool,
    pub pid_namespace: bool,
    /// Mount namespace: read-only filesystem, tmpfs cwd, fresh `/proc`.
    pub mount_namespace: bool,
    /// Runs under a per-run unprivileged uid (root only).
    pub dropped_privileges: bool,
    /// Settings tried and refused, with the error (e.g. `"user+net+pid+mount: EPERM"`).
    pub refused: Vec<String>,
}

/// Why a program could not be run at all (its own failures are a [`Status`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Not Linux.
    #[error("sandbox unsupported on {0}: it needs Linux (namespaces, rlimits, pidfd)")]
    Unsupported(&'static str),
    /// An empty command line.
    #[error("sandbox: empty command line")]
    EmptyCommand,
    /// A file name with a `/`, a NUL or nothing in it.
    #[error("sandbox: bad file name `{0}` (a plain name is needed)")]
    BadFileName(String),
    /// Setting up, spawning or reading the child failed.
    #[error("sandbox: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Directories searched for a program named without a `/`: the sandbox's own `PATH`.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Find a program as the sandbox would run it: a name with a `/` as it is; otherwise the first
/// executable file of that name in [`SANDBOX_PATH`], then in the trainer's `PATH`.
pub fn resolve_program(name: &str) -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    if name.is_empty() {
        return None;
    }
    let executable = |p: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        }
        #[cfg(not(unix))]
        {
            p.is_file()
        }
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    let trainer_path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(SANDBOX_PATH).chain(std::env::split_paths(&trainer_path));
    dirs.map(|d| d.join(name)).find(|p| executable(p))
}

#[cfg(target_os = "linux")]
pub use linux::{Sandbox, run_plain};

#[cfg(not(target_os = "linux"))]
pub use other::{Sandbox, run_plain};

#[cfg(not(target_os = "linux"))]
mod other {
    use super::*;

    /// A sandbox: on this OS, none can be made.
    #[derive(Debug, Clone)]
    pub struct Sandbox;

    impl Sandbox {
        /// Always [`SandboxError::Unsupported`] off Linux.
        pub fn new(_limits: Limits, _isolation: Isolation) -> Result<Sandbox, SandboxError> {
            Err(SandboxError::Unsupported(std::env::consts::OS))
        }
        pub fn support(&self) -> &Support {
            unreachable!("no Sandbox exists off Linux")
        }
        pub fn limits(&self) -> &Limits {
            unreachable!("no Sandbox exists off Linux")
        }
        pub fn steps(&self) -> String {
            "none".into()
        }
        pub fn run(
            &self,
            _argv: &[String],
            _files: &[(&str, &[u8])],
            _stdin: &[u8],
        ) -> Result<Outcome, SandboxError> {
            Err(SandboxError::Unsupported(std::env::consts::OS))
        }
    }

    /// Off Linux: unsupported.
    pub fn run_plain(
        _argv: &[String],
        _files: &[(&str, &[u8])],
        _stdin: &[u8],
        _wall_time: Duration,
    ) -> Result<Outcome, SandboxError> {
        Err(SandboxError::Unsupported(std::env::consts::OS))
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use std::ffi::CString;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;

    /// `struct mount_attr` of `mount_setattr(2)` (not in the libc crate).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    /// Which isolation steps a run takes (requested ∧ supported).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Steps {
        user: bool,
        net: bool,
        pid: bool,
        mount: bool,
        drop: bool,
    }

    impl Steps {
        fn label(&self) -> String {
            let mut parts = Vec::new();
            for (on, name) in [
                (self.drop, "drop-uid"),
                (self.user, "user"),
                (self.net, "net"),
                (self.pid, "pid"),
                (self.mount, "mount"),
            ] {
                if on {
                    parts.push(name);
                }
            }
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join("+")
            }
        }
    }

    /// Everything the child needs between fork and exec, prepared before the fork.
    struct ChildPlan {
        steps: Steps,
        uid: libc::uid_t,
        gid: libc::gid_t,
        /// For a user namespace: `"<uid> <uid> 1"` and `"<gid> <gid> 1"`.
        uid_map: CString,
        gid_map: CString,
        dir: CString,
        tmpfs_opts: CString,
        files: Vec<(CString, Vec<u8>)>,
        rlimits: Vec<(Resource, libc::rlim_t)>,
    }

    #[cfg(target_env = "gnu")]
    type Resource = libc::__rlimit_resource_t;
    #[cfg(not(target_env = "gnu"))]
    type Resource = libc::c_int;

    fn errno() -> i32 {
        // SAFETY: errno is thread-local and always readable.
        unsafe { *libc::__errno_location() }
    }

    fn check(r: libc::c_int) -> io::Result<()> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Write all of `data` to a path (async-signal-safe: open/write/close).
    unsafe fn write_file(path: &[u8], data: &[u8], flags: libc::c_int) -> io::Result<()> {
        // SAFETY: `path` is NUL-terminated by the caller; plain syscalls.
        unsafe {
            let fd = libc::open(path.as_ptr().cast(), flags | libc::O_CLOEXEC, 0o644);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = data;
            while !rest.is_empty() {
                let n = libc::write(fd, rest.as_ptr().cast(), rest.len());
                if n < 0 {
                    if errno() == libc::EINTR {
                        continue;
                    }
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                rest = &rest[n as usize..];
            }
            libc::close(fd);
            Ok(())
        }
    }

    unsafe fn drop_privileges(p: &ChildPlan) -> io::Result<()> {
        // SAFETY: plain syscalls.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(p.gid, p.gid, p.gid))?;
            check(libc::setresuid(p.uid, p.uid, p.uid))
        }
    }

    /// The child's setup between fork and exec. Only system calls on prepared memory.
    unsafe fn child_setup(p: &ChildPlan) -> io::Result<()> {
        let s = p.steps;
        // SAFETY: every call below is a raw system call (async-signal-safe) on memory that was
        // allocated before the fork; nothing allocates.
        unsafe {
            check(libc::setsid())?;
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            check(libc::setrlimit(libc::RLIMIT_CORE, &no_core))?;
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if s.drop && s.user {
                drop_privileges(p)?;
            }
            let mut flags = 0;
            if s.user {
                flags |= libc::CLONE_NEWUSER;
            }
            if s.net {
                flags |= libc::CLONE_NEWNET;
            }
            if s.pid {
                flags |= libc::CLONE_NEWPID;
            }
            if s.mount {
                flags |= libc::CLONE_NEWNS;
            }
            if flags != 0 {
                check(libc::unshare(flags))?;
                // A new user namespace changes credentials, which clears the death signal.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            }
            if s.user {
                write_file(
                    b"/proc/self/uid_map\0",
                    p.uid_map.as_bytes(),
                    libc::O_WRONLY,
                )?;
                write_file(b"/proc/self/setgroups\0", b"deny", libc::O_WRONLY)?;
                write_file(
                    b"/proc/self/gid_map\0",
                    p.gid_map.as_bytes(),
                    libc::O_WRONLY,
                )?;
            }
            if s.pid {
                // The next process created is PID 1 of the new namespace: fork it, and stay as a
                // small waiter that exits as it does (Rust's `Child` is this waiter).
                let pid =
                    libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
                if pid < 0 {
                    return Err(io::Error::last_os_error());
                }
                if pid > 0 {
                    waiter(pid as libc::pid_t);
                }
                // PID 1: dies when the waiter does.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            }
            if s.mount {
                mount_private(p)?;
            }
            if s.drop && !s.user {
                drop_privileges(p)?;
                // Changing credentials clears the parent-death signal.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            }
            for &(res, value) in &p.rlimits {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                let lim = if res == libc::RLIMIT_CPU {
                    // SIGXCPU at the soft limit, SIGKILL a second later.
                    libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value.saturating_add(1),
                    }
                } else {
                    lim
                };
                check(libc::setrlimit(res, &lim))?;
            }
        }
        Ok(())
    }

    /// The new mount namespace: private propagation, fresh /proc (with a PID namespace), a tmpfs
    /// cwd holding the program's files, everything else read-only and nosuid.
    unsafe fn mount_private(p: &ChildPlan) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain syscalls on prepared NUL-terminated strings.
        unsafe {
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            if p.steps.pid {
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?;
            } else {
                // Without its own PID namespace the host's /proc would show the trainer.
                check(libc::mount(
                    c"none".as_ptr(),
                    c"/proc".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=4k,mode=0555".as_ptr().cast(),
                ))?;
            }
            check(libc::mount(
                c"sobre-sandbox".as_ptr(),
                p.dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                p.tmpfs_opts.as_ptr().cast(),
            ))?;
            let ro = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            let r = libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &ro as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            );
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            let rw = MountAttr {
                attr_set: 0,
                attr_clr: MOUNT_ATTR_RDONLY,
                propagation: 0,
                userns_fd: 0,
            };
            let r = libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                p.dir.as_ptr(),
                0 as libc::c_uint,
                &rw as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            );
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            check(libc::chdir(p.dir.as_ptr()))?;
            for (name, data) in &p.files {
                write_file(
                    name.as_bytes_with_nul(),
                    data,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                )?;
            }
        }
        Ok(())
    }

    /// The waiter outside the new PID namespace: close everything but stdio (so that Rust's
    /// exec-error pipe is held by PID 1 alone), wait for PID 1, and end as it ended.
    unsafe fn waiter(pid: libc::pid_t) -> ! {
        // SAFETY: plain syscalls; this process never returns into Rust code.
        unsafe {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) < 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
            let mut st: libc::c_int = 0;
            loop {
                let r = libc::waitpid(pid, &mut st, 0);
                if r == pid {
                    break;
                }
                if r < 0 && errno() != libc::EINTR {
                    libc::_exit(126);
                }
            }
            if libc::WIFEXITED(st) {
                libc::_exit(libc::WEXITSTATUS(st));
            }
            if libc::WIFSIGNALED(st) {
                let sig = libc::WTERMSIG(st);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig);
            }
            libc::_exit(125)
        }
    }

    static SUPPORT: OnceLock<Support> = OnceLock::new();
    static NEXT_UID: AtomicU32 = AtomicU32::new(0);

    /// A fresh unprivileged uid for one run (root only): unique within this process and, by its
    /// pid, very likely across processes. Never a real account's uid.
    fn fresh_uid() -> u32 {
        let n = NEXT_UID.fetch_add(1, Ordering::Relaxed) % 10_000;
        1_500_000_000 + (std::process::id() % 60_000) * 10_000 + n
    }

    fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
        let what = what.into();
        move |source| SandboxError::Io { what, source }
    }

    fn errno_name(e: &io::Error) -> String {
        match e.raw_os_error() {
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::EACCES) => "EACCES".into(),
            Some(libc::EINVAL) => "EINVAL".into(),
            Some(libc::ENOSPC) => "ENOSPC".into(),
            Some(libc::ENOSYS) => "ENOSYS".into(),
            Some(libc::EAGAIN) => "EAGAIN".into(),
            _ => e.to_string(),
        }
    }

    /// Probe once: the strongest settings under which `/bin/sh -c 'exit 0'` runs.
    fn probe() -> Support {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let all = Steps {
            user: !root,
            net: true,
            pid: true,
            mount: true,
            drop: root,
        };
        let mut candidates = vec![
            all,
            Steps {
                mount: false,
                ..all
            },
            Steps {
                mount: false,
                pid: false,
                ..all
            },
        ];
        if root {
            // Root without CAP_SYS_ADMIN (a container): namespaces through a user namespace.
            let via_user = Steps { user: true, ..all };
            candidates.push(via_user);
            candidates.push(Steps {
                mount: false,
                ..via_user
            });
        }
        candidates.push(Steps {
            user: false,
            net: false,
            pid: false,
            mount: false,
            drop: root,
        });
        candidates.push(Steps {
            user: false,
            net: false,
            pid: false,
            mount: false,
            drop: false,
        });
        let mut refused = Vec::new();
        let probe_limits = Limits {
            wall_time: Duration::from_secs(10),
            ..Limits::default()
        };
        let argv = ["/bin/sh".to_string(), "-c".into(), "exit 0".into()];
        for steps in candidates {
            match run_with(&steps, &probe_limits, &argv, &[], b"") {
                Ok(o) if o.success() => {
                    return Support {
                        root,
                        user_namespace: steps.user,
                        network_namespace: steps.net,
                        pid_namespace: steps.pid,
                        mount_namespace: steps.mount,
                        dropped_privileges: steps.drop,
                        refused,
                    };
                }
                Ok(o) => refused.push(format!("{}: probe ended {:?}", steps.label(), o.status)),
                Err(SandboxError::Io { source, .. }) => {
                    refused.push(format!("{}: {}", steps.label(), errno_name(&source)))
                }
                Err(e) => refused.push(format!("{}: {e}", steps.label())),
            }
        }
        Support {
            root,
            user_namespace: false,
            network_namespace: false,
            pid_namespace: false,
            mount_namespace: false,
            dropped_privileges: false,
            refused,
        }
    }

    /// A configured sandbox: limits, and the isolation steps this kernel allows.
    #[derive(Debug, Clone)]
    pub struct Sandbox {
        limits: Limits,
        steps: Steps,
        support: Support,
    }

    impl Sandbox {
        /// A sandbox with these limits, taking every requested isolation step the kernel allows
        /// (probed on first use, once per process).
        pub fn new(limits: Limits, isolation: Isolation) -> Result<Sandbox, SandboxError> {
            let support = SUPPORT.get_or_init(probe).clone();
            let net = isolation.network && support.network_namespace;
            let pid = isolation.pid && support.pid_namespace;
            let mount = isolation.filesystem && support.mount_namespace;
            let drop = isolation.drop_privileges && support.dropped_privileges;
            let steps = Steps {
                user: support.user_namespace && (net || pid || mount),
                net,
                pid,
                mount,
                drop,
            };
            Ok(Sandbox {
                limits,
                steps,
                support,
            })
        }

        /// What the kernel allowed (the probe's result).
        pub fn support(&self) -> &Support {
            &self.support
        }

        /// The limits of every run.
        pub fn limits(&self) -> &Limits {
            &self.limits
        }

        /// The isolation steps each run takes, e.g. `"drop-uid+net+pid+mount"`.
        pub fn steps(&self) -> String {
            self.steps.label()
        }

        /// Run `argv` (the program resolved to a path by the caller, see [`resolve_program`]) in
        /// a fresh directory holding `files`, with `stdin` as its input.
        pub fn run(
            &self,
            argv: &[String],
            files: &[(&str, &[u8])],
            stdin: &[u8],
        ) -> Result<Outcome, SandboxError> {
            run_with(&self.steps, &self.limits, argv, files, stdin)
        }
    }

    fn check_name(name: &str) -> Result<CString, SandboxError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(SandboxError::BadFileName(name.into()));
        }
        CString::new(name).map_err(|_| SandboxError::BadFileName(name.into()))
    }

    fn run_with(
        steps: &Steps,
        limits: &Limits,
        argv: &[String],
        files: &[(&str, &[u8])],
        stdin: &[u8],
    ) -> Result<Outcome, SandboxError> {
        let (program, args) = argv.split_first().ok_or(SandboxError::EmptyCommand)?;
        let dir = tempfile::Builder::new()
            .prefix("sobre-sandbox-")
            .tempdir()
            .map_err(io_err("creating the run directory"))?;
        let uid = if steps.drop {
            fresh_uid()
        } else {
            // SAFETY: no preconditions.
            unsafe { libc::geteuid() }
        };
        let gid = if steps.drop {
            uid
        } else {
            // SAFETY: no preconditions.
            unsafe { libc::getegid() }
        };
        let mut named = Vec::with_capacity(files.len());
        for (name, data) in files {
            named.push((check_name(name)?, data.to_vec()));
        }
        if !steps.mount {
            // No private tmpfs: the files go in the host directory, owned by the run's uid.
            for (name, data) in files {
                std::fs::write(dir.path().join(name), data)
                    .map_err(io_err(format!("writing {name}")))?;
            }
            if steps.drop {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                    .map_err(io_err("chown of the run directory"))?;
            }
        }
        let mut rlimits = Vec::new();
        if let Some(t) = limits.cpu_time {
            let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
            rlimits.push((libc::RLIMIT_CPU, secs.max(1)));
        }
        for (res, v) in [
            (libc::RLIMIT_AS, limits.memory_bytes),
            (libc::RLIMIT_NPROC, limits.processes),
            (libc::RLIMIT_FSIZE, limits.file_size_bytes),
            (libc::RLIMIT_NOFILE, limits.open_files),
        ] {
            if let Some(v) = v {
                rlimits.push((res, v));
            }
        }
        let owner = if steps.user || !steps.drop {
            String::new()
        } else {
            format!(",uid={uid},gid={gid}")
        };
        let cstr = |s: String| CString::new(s).map_err(|_| SandboxError::BadFileName("?".into()));
        let plan = ChildPlan {
            steps: *steps,
            uid,
            gid,
            uid_map: cstr(format!("{uid} {uid} 1"))?,
            gid_map: cstr(format!("{gid} {gid} 1"))?,
            dir: CString::new(dir.path().as_os_str().as_bytes())
                .map_err(|_| SandboxError::BadFileName(dir.path().display().to_string()))?,
            tmpfs_opts: cstr(format!(
                "size={},mode=0700{owner}",
                limits.disk_bytes.max(4096)
            ))?,
            files: named,
            rlimits,
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes system calls on memory prepared above.
        unsafe {
            cmd.pre_exec(move || child_setup(&plan));
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(io_err(format!("starting {program}")))?;
        let out = drive(child, stdin, limits, started, true);
        drop(dir);
        out
    }

    /// Run `argv` as a plain subprocess, without limits or isolation (the benchmark's baseline):
    /// the same temporary directory, files, piping and wall-clock timeout as [`Sandbox::run`].
    pub fn run_plain(
        argv: &[String],
        files: &[(&str, &[u8])],
        stdin: &[u8],
        wall_time: Duration,
    ) -> Result<Outcome, SandboxError> {
        let (program, args) = argv.split_first().ok_or(SandboxError::EmptyCommand)?;
        let dir = tempfile::Builder::new()
            .prefix("sobre-plain-")
            .tempdir()
            .map_err(io_err("creating the run directory"))?;
        for (name, data) in files {
            check_name(name)?;
            std::fs::write(dir.path().join(name), data)
                .map_err(io_err(format!("writing {name}")))?;
        }
        let started = Instant::now();
        let child = Command::new(program)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("starting {program}")))?;
        let limits = Limits {
            wall_time,
            stdout_bytes: usize::MAX,
            stderr_bytes: usize::MAX,
            ..Limits::default()
        };
        drive(child, stdin, &limits, started, false)
    }

    fn set_nonblocking(fd: RawFd) -> io::Result<()> {
        // SAFETY: fcntl on an fd we own.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            check(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))
        }
    }

    /// An output pipe read up to a cap.
    struct Capped<R> {
        pipe: Option<R>,
        buf: Vec<u8>,
        cap: usize,
        over: bool,
    }

    impl<R: Read + AsRawFd> Capped<R> {
        fn new(pipe: Option<R>, cap: usize) -> io::Result<Self> {
            if let Some(p) = &pipe {
                set_nonblocking(p.as_raw_fd())?;
            }
            Ok(Capped {
                pipe,
                buf: Vec::new(),
                cap,
                over: false,
            })
        }

        fn fd(&self) -> Option<RawFd> {
            self.pipe.as_ref().map(AsRawFd::as_raw_fd)
        }

        /// Read what is there; close on EOF or error.
        fn pump(&mut self) {
            let Some(p) = self.pipe.as_mut() else {
                return;
            };
            let mut chunk = [0u8; 65536];
            loop {
                match p.read(&mut chunk) {
                    Ok(0) => {
                        self.pipe = None;
                        return;
                    }
                    Ok(n) => {
                        let room = self.cap.saturating_sub(self.buf.len());
                        self.buf.extend_from_slice(&chunk[..n.min(room)]);
                        if n > room {
                            self.over = true;
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => {
                        self.pipe = None;
                        return;
                    }
                }
            }
        }
    }

    fn kill_child(pid: u32, group: bool) {
        let pid = pid as libc::pid_t;
        // SAFETY: kill has no memory preconditions; the child is not reaped yet, so its pid
        // (and process group id) cannot have been reused.
        unsafe {
            libc::kill(if group { -pid } else { pid }, libc::SIGKILL);
        }
    }

    /// Has the child exited? (Without reaping it, so its process group id stays ours.)
    fn exited_nowait(pid: u32) -> bool {
        // SAFETY: waitid writes into a zeroed siginfo_t we own.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() != 0
        }
    }

    /// Feed stdin, read stdout/stderr with caps, enforce the wall clock, reap the child.
    fn drive(
        mut child: Child,
        input: &[u8],
        limits: &Limits,
        started: Instant,
        group: bool,
    ) -> Result<Outcome, SandboxError> {
        let pid = child.id();
        let result = drive_inner(&mut child, input, limits, started, group);
        // Whatever happened, nothing of the run outlives this call.
        kill_child(pid, group);
        let status = child.wait().map_err(io_err("waiting for the program"));
        let (killed, stdout, stderr) = result?;
        let status = status?;
        let wall = started.elapsed();
        let status = match killed {
            Some(s) => s,
            None => match (status.code(), status.signal()) {
                (Some(c), _) => Status::Exited(c),
                (None, Some(libc::SIGXCPU)) => Status::CpuTimeLimit,
                (None, Some(libc::SIGXFSZ)) => Status::FileSizeLimit,
                (None, Some(s)) => Status::Signaled(s),
                (None, None) => Status::Signaled(0),
            },
        };
        Ok(Outcome {
            status,
            stdout,
            stderr,
            wall,
        })
    }

    type Driven = (Option<Status>, Vec<u8>, Vec<u8>);

    fn drive_inner(
        child: &mut Child,
        input: &[u8],
        limits: &Limits,
        started: Instant,
        group: bool,
    ) -> Result<Driven, SandboxError> {
        let pid = child.id();
        let setup = io_err("setting up the program's pipes");
        let mut stdin = child.stdin.take();
        if input.is_empty() {
            stdin = None;
        } else if let Some(s) = &stdin {
            set_nonblocking(s.as_raw_fd()).map_err(setup)?;
        }
        let mut written = 0usize;
        let mut out = Capped::new(child.stdout.take(), limits.stdout_bytes)
            .map_err(io_err("setting up stdout"))?;
        let mut err = Capped::new(child.stderr.take(), limits.stderr_bytes)
            .map_err(io_err("setting up stderr"))?;
        // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new fd we own.
        let pidfd = unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32);
            (fd >= 0).then(|| OwnedFd::from_raw_fd(fd as RawFd))
        };
        let deadline = started + limits.wall_time;
        let mut exited = false;
        // After exit, give the pipes a moment to deliver what is buffered.
        let mut grace_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline && !exited {
                kill_child(pid, group);
                return Ok((Some(Status::WallTimeout), out.buf, err.buf));
            }
            if out.over || err.over {
                kill_child(pid, group);
                return Ok((Some(Status::OutputLimit), out.buf, err.buf));
            }
            if exited && out.pipe.is_none() && err.pipe.is_none() {
                break;
            }
            if grace_until.is_some_and(|g| now >= g) {
                break;
            }
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
            let mut push = |fd: RawFd, events: libc::c_short| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            };
            if let Some(s) = &stdin {
                push(s.as_raw_fd(), libc::POLLOUT);
            }
            if let Some(fd) = out.fd() {
                push(fd, libc::POLLIN);
            }
            if let Some(fd) = err.fd() {
                push(fd, libc::POLLIN);
            }
            let watch_exit = !exited && pidfd.is_some();
            if let (true, Some(fd)) = (watch_exit, &pidfd) {
                push(fd.as_raw_fd(), libc::POLLIN);
            }
            let until = grace_until.unwrap_or(deadline).min(deadline.max(now));
            let mut wait_ms = until.saturating_duration_since(now).as_millis().min(60_000) as i32;
            if !exited && pidfd.is_none() {
                wait_ms = wait_ms.min(5);
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let r =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms.max(1)) };
            if r < 0 && errno() != libc::EINTR {
                return Err(io_err("poll")(io::Error::last_os_error()));
            }
            out.pump();
            err.pump();
            if let Some(s) = stdin.as_mut() {
                match s.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EPIPE: the program does not read its input; that is its business.
                    Err(_) => written = input.len(),
                }
                if written >= input.len() {
                    stdin = None;
                }
            }
            if !exited && exited_nowait(pid) {
                exited = true;
                // Processes it left behind (without a PID namespace) die now, so their pipes
                // close; with one, they died with PID 1 already.
                kill_child(pid, group);
                grace_until = Some(Instant::now() + Duration::from_millis(200));
            }
        }
        Ok((None, out.buf, err.buf))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    pub(super) fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn echo_cat_and_exit_codes() {
        let sb = Sandbox::new(Limits::default(), Isolation::default()).unwrap();
        let o = sb
            .run(&sh("cat; echo err >&2; exit 3"), &[], b"hello\n")
            .unwrap();
        assert_eq!(o.status, Status::Exited(3));
        assert_eq!(o.stdout, b"hello\n");
        assert_eq!(o.stderr, b"err\n");
        let o = sb
            .run(
                &sh("cat data.txt; pwd >/dev/null"),
                &[("data.txt", b"x y")],
                b"",
            )
            .unwrap();
        assert!(o.success(), "{o:?}");
        assert_eq!(o.stdout, b"x y");
    }

    #[test]
    fn empty_environment_and_minimal_path() {
        let sb = Sandbox::new(Limits::default(), Isolation::default()).unwrap();
        let o = sb.run(&sh("env | sort"), &[], b"").unwrap();
        let env = String::from_utf8_lossy(&o.stdout);
        let vars: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split('=').next())
            .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
            .collect();
        assert_eq!(vars, vec!["PATH"], "{env}");
        assert!(env.contains(&format!("PATH={SANDBOX_PATH}")), "{env}");
    }

    #[test]
    fn wall_timeout_kills_sleepers() {
        let limits = Limits {
            wall_time: Duration::from_millis(300),
            ..Limits::default()
        };
        let sb = Sandbox::new(limits, Isolation::default()).unwrap();
        let t = std::time::Instant::now();
        let o = sb.run(&sh("sleep 30 & sleep 30"), &[], b"").unwrap();
        assert_eq!(o.status, Status::WallTimeout);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn output_cap() {
        let limits = Limits {
            stdout_bytes: 1000,
            ..Limits::default()
        };
        let sb = Sandbox::new(limits, Isolation::default()).unwrap();
        let o = sb.run(&sh("yes"), &[], b"").unwrap();
        assert_eq!(o.status, Status::OutputLimit);
        assert_eq!(o.stdout.len(), 1000);
    }

    #[test]
    fn bad_names_and_empty_commands_are_errors() {
        let sb = Sandbox::new(Limits::default(), Isolation::default()).unwrap();
        assert!(matches!(
            sb.run(&sh("true"), &[("../x", b"")], b""),
            Err(SandboxError::BadFileName(_))
        ));
        assert!(matches!(
            sb.run(&[], &[], b""),
            Err(SandboxError::EmptyCommand)
        ));
        let e = sb.run(&["/nonexistent/prog".into()], &[], b"").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/prog"), "{e}");
    }

    #[test]
    fn plain_runs_too() {
        let o = run_plain(&sh("cat; exit 2"), &[], b"abc", Duration::from_secs(5)).unwrap();
        assert_eq!(o.status, Status::Exited(2));
        assert_eq!(o.stdout, b"abc");
    }

    #[test]
    fn resolves_programs() {
        assert_eq!(
            resolve_program("sh").map(|p| p.starts_with("/usr") || p.starts_with("/bin")),
            Some(true)
        );
        assert_eq!(resolve_program("no-such-program-sobre"), None);
        assert_eq!(resolve_program(""), None);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod support_tests {
    use super::tests::sh;
    use super::*;

    /// Prints what this kernel allowed (`cargo test -p sobre-reward support -- --nocapture`).
    #[test]
    fn support_is_probed_and_reported() {
        let sb = Sandbox::new(Limits::default(), Isolation::default()).unwrap();
        let s = sb.support();
        println!("sandbox support: {}", serde_json::to_string(s).unwrap());
        println!("sandbox steps: {}", sb.steps());
        // As root the per-run uid is always possible; otherwise a user namespace is needed.
        assert_eq!(s.dropped_privileges, s.root);
        let none = Sandbox::new(
            Limits::default(),
            Isolation {
                network: false,
                pid: false,
                filesystem: false,
                drop_privileges: false,
            },
        )
        .unwrap();
        assert_eq!(none.steps(), "none");
        // Without namespaces (the last fallback) the limits and the group kill still hold.
        let o = none
            .run(&sh("echo $HOME; sleep 30 & exit 0"), &[], b"")
            .unwrap();
        assert_eq!(
            (o.status, o.stdout.as_slice()),
            (Status::Exited(0), &b"\n"[..])
        );
        let o = none
            .run(&sh("ulimit -v; ulimit -f; ulimit -n; ulimit -t"), &[], b"")
            .unwrap();
        let want = format!(
            "{}\n{}\n256\n10\n",
            (1u64 << 30) / 1024,
            (16u64 << 20) / 512
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), want);
    }
}
