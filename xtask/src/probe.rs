//! Clients the bench runs inside a lab's client cgroup, where the agent's
//! programs are attached: `xtask probe ...` (a hidden command of this same
//! binary), so they cost no interpreter and time only the system call.
//!
//! - `connect`: TCP connections, each timed from `connect()` to its
//!   return (the SYN, the socket hook or the nat rules, the SYN-ACK), and
//!   closed with a reset so that no TIME_WAIT piles up; optionally checks
//!   that `getpeername()` shows the address dialled.
//! - `udp-choices`: UDP sockets connected and closed: each `connect()` is
//!   one load-balancing choice and sends nothing, so the backends need not
//!   exist.
//!
//! [`ChangeProber`] is Python, kept running: told which pod to wait for,
//! it makes HTTP requests until that pod answers, and says how long it
//! took (a few hundred microseconds of that are its own, per request).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    process::{ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::Lab;

/// Percentiles of connect latency, from one run of `connect`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectLatency {
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs `count` timed TCP connects to `target` in `lab`'s client cgroup.
pub fn connect_latency(
    lab: &Lab,
    target: SocketAddr,
    count: usize,
    check_peer: bool,
) -> Result<ConnectLatency> {
    let (target, count) = (target.to_string(), count.to_string());
    let mut args = vec!["connect", &target, &count];
    if check_peer {
        args.push("--check-peer");
    }
    let text = run_probe(lab, &args)?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(p50)), Some(Ok(p99))) = (fields.next(), fields.next()) else {
        bail!("the connect probe said {text:?}");
    };
    Ok(ConnectLatency {
        p50: Duration::from_nanos(p50),
        p99: Duration::from_nanos(p99),
    })
}

/// Connects `count` UDP sockets to `target` in `lab`'s client cgroup.
pub fn udp_choices(lab: &Lab, target: SocketAddrV4, count: usize) -> Result<()> {
    run_probe(
        lab,
        &["udp-choices", &target.to_string(), &count.to_string()],
    )
    .map(drop)
}

/// `xtask probe ARGS` in `lab`'s client cgroup; its output.
fn run_probe(lab: &Lab, args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let out = lab.run_client(&exe.display().to_string(), &[&["probe"], args].concat())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "probe {args:?} failed: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// `xtask probe connect`: prints the p50 and p99 in nanoseconds.
pub fn run_connect(target: SocketAddr, count: usize, check_peer: bool) -> Result<()> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(family_of(target), libc::SOCK_STREAM)?;
        socket.reset_on_close()?;
        let started = Instant::now();
        socket.connect(target)?;
        samples.push(started.elapsed());
        if check_peer {
            let peer = socket.peer()?;
            if peer != target {
                bail!("getpeername() shows {peer}, not {target}");
            }
        }
    }
    let (p50, p99) = percentiles(&mut samples);
    println!("{} {}", p50.as_nanos(), p99.as_nanos());
    Ok(())
}

/// The p50 and p99 of `samples` (nearest rank), which it sorts.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort();
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into the samples"
        )]
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    (at(0.50), at(0.99))
}

/// `xtask probe udp-choices`.
pub fn run_udp_choices(target: SocketAddrV4, count: usize) -> Result<()> {
    for _ in 0..count {
        Socket::new(libc::AF_INET, libc::SOCK_DGRAM)?.connect(target.into())?;
    }
    println!("{count}");
    Ok(())
}

/// The address family of a socket that can reach `target`.
fn family_of(target: SocketAddr) -> libc::c_int {
    if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// A socket closed on drop.
struct Socket(libc::c_int);

impl Socket {
    fn new(family: libc::c_int, kind: libc::c_int) -> Result<Self> {
        // SAFETY: socket() takes no pointers.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        Ok(Self(fd))
    }

    fn reset_on_close(&self) -> Result<()> {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the pointer and length describe `linger`, which outlives
        // the call.
        let rc = unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                socklen::<libc::linger>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_LINGER");
        }
        Ok(())
    }

    fn connect(&self, target: SocketAddr) -> Result<()> {
        let (storage, length) = sockaddr_of(target)?;
        // SAFETY: the pointer and length describe `storage`, which outlives
        // the call.
        let rc = unsafe { libc::connect(self.0, std::ptr::from_ref(&storage).cast(), length) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("connect() to {target}"));
        }
        Ok(())
    }

    fn peer(&self) -> Result<SocketAddr> {
        // SAFETY: all zeroes is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut length = socklen::<libc::sockaddr_storage>();
        // SAFETY: the pointers describe `storage` and `length`, which
        // outlive the call.
        let rc = unsafe {
            libc::getpeername(
                self.0,
                std::ptr::from_mut(&mut storage).cast(),
                &raw mut length,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("getpeername()");
        }
        address_of(&storage)
    }
}

/// `target` as the kernel takes it, and its length.
fn sockaddr_of(target: SocketAddr) -> Result<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match target {
        SocketAddr::V4(target) => {
            let address = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET)?,
                sin_port: target.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*target.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // every sockaddr.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(address);
            };
            socklen::<libc::sockaddr_in>()
        }
        SocketAddr::V6(target) => {
            let address = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6)?,
                sin6_port: target.port().to_be(),
                sin6_flowinfo: target.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: target.ip().octets(),
                },
                sin6_scope_id: target.scope_id(),
            };
            // SAFETY: as above.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(address);
            };
            socklen::<libc::sockaddr_in6>()
        }
    };
    Ok((storage, length))
}

/// The address in `storage`, as getpeername() filled it.
fn address_of(storage: &libc::sockaddr_storage) -> Result<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it holds a sockaddr_in.
            let address = unsafe {
                std::ptr::from_ref(storage)
                    .cast::<libc::sockaddr_in>()
                    .read()
            };
            Ok(SocketAddrV4::new(
                u32::from_be(address.sin_addr.s_addr).into(),
                u16::from_be(address.sin_port),
            )
            .into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it holds a sockaddr_in6.
            let address = unsafe {
                std::ptr::from_ref(storage)
                    .cast::<libc::sockaddr_in6>()
                    .read()
            };
            Ok(SocketAddrV6::new(
                address.sin6_addr.s6_addr.into(),
                u16::from_be(address.sin6_port),
                address.sin6_flowinfo,
                address.sin6_scope_id,
            )
            .into())
        }
        family => bail!("getpeername() gave an address of family {family}"),
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this value's own.
        unsafe { libc::close(self.0) };
    }
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A Python process in the lab's cgroup that connects to the probe VIP on
/// request until the wanted pod answers.
pub struct ChangeProber {
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    _child: ChildGuard,
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PROBER: &str = r"
import socket, sys, time
VIP = (sys.argv[1], 80)
def ask():
    s = socket.socket(socket.AF_INET6 if ':' in VIP[0] else socket.AF_INET)
    s.settimeout(1)
    try:
        s.connect(VIP)
        s.sendall(b'GET / HTTP/1.0\r\n\r\n')
        data = b''
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.rsplit(b'\r\n\r\n', 1)[-1].strip().decode()
    except OSError:
        return None
    finally:
        s.close()
print('ready', flush=True)
for line in sys.stdin:
    want = line.strip()
    start = time.monotonic()
    while True:
        got = ask()
        if got and (not want or got == want):
            break
        if time.monotonic() > start + 60:
            got = 'timeout'
            break
        if got is None:
            time.sleep(0.0005)
    print(got, int((time.monotonic() - start) * 1e6), '%.6f' % time.time(), flush=True)
";

impl ChangeProber {
    pub fn start(lab: &Lab, vip: &str) -> Result<Self> {
        let mut child = lab
            .client("python3")
            .args(["-c", PROBER, vip])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the prober")?;
        let input = child.stdin.take().context("no stdin")?;
        let output = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut prober = Self {
            input,
            output,
            _child: ChildGuard(child),
        };
        let mut line = String::new();
        prober.output.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the prober did not start: {line:?}");
        }
        Ok(prober)
    }

    /// Starts connecting until `pod` answers (any pod, for "").
    pub fn expect(&mut self, pod: &str) -> Result<()> {
        writeln!(self.input, "{pod}")?;
        self.input.flush()?;
        Ok(())
    }

    /// The answer: the pod, how long it took, and when it came.
    pub fn answer(&mut self) -> Result<(String, Duration, SystemTime)> {
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [pod, micros, at] = fields.as_slice() else {
            bail!("the prober said {line:?}");
        };
        if *pod == "timeout" {
            bail!("the probe Service did not answer as expected within 60 s");
        }
        let at: f64 = at.parse()?;
        Ok((
            (*pod).to_owned(),
            Duration::from_micros(micros.parse()?),
            UNIX_EPOCH + Duration::from_secs_f64(at),
        ))
    }

    /// How long the prober took to see `pod` answer.
    pub fn moved_to(&mut self, pod: &str) -> Result<Duration> {
        let (answer, took, _) = self.answer()?;
        if answer != pod {
            bail!("the probe answered {answer:?}, not {pod}");
        }
        Ok(took)
    }
}
