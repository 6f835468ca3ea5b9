//! Is the random choice of a backend fair? Services of 2, 3, 5, 10 and 100
//! backends each get many choices (UDP sockets connected through their
//! ClusterIP: one choice each, and nothing sent, so the backends are
//! addresses on the pods' bridge that nobody dials), and the datapath's own per-slot counters
//! (`services --stats`) say where each went. A chi-square test against the
//! uniform split gives p, and the busiest backend's share over the idlest
//! one's shows the spread.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    lab::{Lab, manifests},
    probe,
};

const BACKENDS: [u8; 5] = [2, 3, 5, 10, 100];
const PORT: u16 = 53;

/// One Service's split.
pub struct Fairness {
    backends: usize,
    chi_square: f64,
    p: f64,
    max_over_min: f64,
}

pub fn measure(agent_binary: &Path, choices: usize) -> Result<Vec<Fairness>> {
    eprintln!("bench: fairness of the random choice");
    let lab = Lab::new()?;
    let service_port = [("dns", i64::from(PORT), "UDP")];
    let target_port = [("dns", PORT, "UDP")];
    let mut documents = Vec::new();
    for k in BACKENDS {
        let name = format!("fair-{k}");
        // On the pods' bridge, so that a connected socket has a route, and
        // above the pods' addresses.
        let [a, b, c, _] = lab.bridge_ip().octets();
        let endpoints: Vec<(Ipv4Addr, bool)> = (0..k)
            .map(|j| (Ipv4Addr::new(a, b, c, 100 + j), true))
            .collect();
        documents.push(manifests::service(
            &name,
            &vip(k).to_string(),
            &service_port,
        ));
        documents.push(manifests::endpoint_slice(
            &format!("{name}-1"),
            &name,
            &target_port,
            &endpoints,
        ));
    }
    lab.write_manifest("fair.yaml", &manifests::documents(&documents))?;
    let agent = lab.start_agent(agent_binary)?;
    for k in BACKENDS {
        probe::udp_choices(&lab, SocketAddrV4::new(vip(k), PORT), choices)?;
    }
    let listed: serde_json::Value = serde_json::from_str(&agent.services_stats_json()?)?;
    BACKENDS
        .iter()
        .map(|&k| {
            let frontend = format!("{}:{PORT}", vip(k));
            let service = listed
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["frontend"] == frontend.as_str())
                .with_context(|| format!("{frontend} is not listed"))?;
            // A backend may hold more than one slot: count by address.
            let mut counts = BTreeMap::<String, u64>::new();
            for slot in service["backends"].as_array().into_iter().flatten() {
                let address = slot["address"].as_str().unwrap_or_default().to_owned();
                *counts.entry(address).or_default() += slot["translations"].as_u64().unwrap_or(0);
            }
            let counts: Vec<u64> = counts.into_values().collect();
            if counts.len() != usize::from(k) || counts.iter().sum::<u64>() != choices as u64 {
                bail!("{frontend}: {choices} choices over {k} backends, but counted {counts:?}");
            }
            Ok(split(&counts))
        })
        .collect()
}

/// The markdown table.
pub fn table(results: &[Fairness], choices: usize) -> String {
    let mut out = format!(
        "\n## Fairness of the random choice\n\n\
         {choices} choices per Service (UDP connects), counted per backend by the datapath.\n\n\
         | backends | chi-square | degrees of freedom | p | busiest / idlest |\n|---|---|---|---|---|\n"
    );
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {} | {:.3} | {:.3} |",
            r.backends,
            r.chi_square,
            r.backends - 1,
            r.p,
            r.max_over_min
        );
    }
    out.push_str(
        "\nA fair choice gives p spread evenly over 0–1: p below 0.001 at any size would say \
         the split is not uniform.\n",
    );
    out
}

fn vip(backends: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 1, backends)
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn split(counts: &[u64]) -> Fairness {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    let chi_square = counts
        .iter()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum();
    let max = counts.iter().max().copied().unwrap_or(0) as f64;
    let min = counts.iter().min().copied().unwrap_or(0) as f64;
    let degrees = (counts.len() - 1) as f64;
    Fairness {
        backends: counts.len(),
        chi_square,
        p: upper_regularized_gamma(degrees / 2.0, chi_square / 2.0),
        max_over_min: max / min,
    }
}

/// Q(a, x), the chi-square survival function's core: P(X² ≥ x) for k
/// degrees of freedom is Q(k/2, x/2). A series below a + 1, a continued
/// fraction above (as Numerical Recipes computes it).
#[expect(
    clippy::many_single_char_names,
    reason = "the names of the algorithm as it is published"
)]
fn upper_regularized_gamma(a: f64, x: f64) -> f64 {
    const EPSILON: f64 = 1e-15;
    const TINY: f64 = 1e-300;
    if x <= 0.0 {
        return 1.0;
    }
    let front = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * EPSILON {
                break;
            }
        }
        return 1.0 - sum * front;
    }
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..10_000 {
        let i = f64::from(i);
        let an = -i * (i - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < EPSILON {
            break;
        }
    }
    front * h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // The reflection formula.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        sum += g / (x + f64::from(u8::try_from(i).unwrap_or(u8::MAX)));
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Critical values from chi-square tables.
    #[test]
    fn chi_square_p_matches_the_tables() {
        for (degrees, x, p) in [
            (1.0, 3.841, 0.05),
            (2.0, 9.210, 0.01),
            (4.0, 18.467, 0.001),
            (9.0, 16.919, 0.05),
            (99.0, 123.225, 0.05),
            (99.0, 69.230, 0.99),
        ] {
            let got = upper_regularized_gamma(degrees / 2.0, x / 2.0);
            assert!((got - p).abs() < p * 0.01, "df {degrees}, x {x}: p {got}");
        }
    }

    #[test]
    fn an_even_split_is_fair_and_a_skewed_one_is_not() {
        let even = split(&[10_000, 10_010, 9_990]);
        assert!(even.p > 0.9, "{}", even.p);
        let skewed = split(&[10_500, 10_000, 9_500]);
        assert!(skewed.p < 1e-6, "{}", skewed.p);
        assert!((skewed.max_over_min - 10_500.0 / 9_500.0).abs() < 1e-9);
    }
}
