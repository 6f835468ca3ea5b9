//! loadBalancerSourceRanges: one family's trie of (load-balancer frontend,
//! range) entries, kept equal to the model's outside frontends.
//!
//! The slot-0 flag that makes tc ingress consult the trie
//! ([`proxy_common::FRONTEND_SOURCE_RANGES`]) is the tc frontend table's to
//! write, so this table is written around that table's pass: a frontend's
//! new ranges go in before it ([`SourceRangeTable::add`]), and its old ones
//! come out after it ([`SourceRangeTable::remove_leaving`]). A frontend is
//! then never closed to a client its ranges admit, and while its ranges
//! are replaced it admits the old and the new for the moment between.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, lpm_trie::Key};
use proxy_common::SourceRange;
use tracing::warn;

use super::table::{Owed, Pass};
use crate::{
    maps::{Table, encoding::MapAddress},
    model::{Cidr, ExternalState, L4Addr},
};

/// Whatever value: the trie is asked whether a key matches, not what it
/// holds.
const ADMITTED: u8 = 1;

pub struct SourceRangeTable<A: MapAddress, T> {
    /// For the log: which table.
    name: &'static str,
    trie: T,
    /// What the trie holds, by frontend.
    written: BTreeMap<L4Addr, BTreeSet<Cidr>>,
    pub owed: Owed<A>,
    /// Entries to take out once the tc frontend table's pass is done.
    leaving: Vec<(L4Addr, Cidr)>,
}

impl<A, T> SourceRangeTable<A, T>
where
    A: MapAddress,
    T: Table<Key<SourceRange<A>>, u8>,
{
    /// Takes over the trie with whatever it holds; nothing is written
    /// before the first [`Owed::view`].
    pub fn adopt(name: &'static str, trie: T) -> Result<Self, MapError> {
        let mut written: BTreeMap<L4Addr, BTreeSet<Cidr>> = BTreeMap::new();
        for (key, _) in trie.entries()? {
            if let Some((frontend, range)) = L4Addr::from_source_range_key(&key) {
                written.entry(frontend).or_default().insert(range);
            }
        }
        Ok(Self {
            name,
            trie,
            written,
            owed: Owed::default(),
            leaving: Vec::new(),
        })
    }

    /// How many (frontend, range) entries the trie holds.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.written.values().map(BTreeSet::len).sum()
    }

    /// Writes the ranges `external`'s frontends have and the trie lacks,
    /// and notes those it holds that they lack for
    /// [`SourceRangeTable::remove_leaving`]. Call before the tc frontend
    /// table's pass.
    pub fn add(&mut self, external: &ExternalState) -> Pass {
        let full = std::mem::take(&mut self.owed.full_pass);
        let frontends: BTreeSet<L4Addr> = if full {
            self.owed.pending.clear();
            self.written
                .keys()
                .copied()
                .chain(
                    external
                        .frontends
                        .iter()
                        .filter(|(addr, frontend)| {
                            frontend.source_ranges.is_some() && addr.service_key::<A>().is_some()
                        })
                        .map(|(addr, _)| *addr),
                )
                .collect()
        } else {
            std::mem::take(&mut self.owed.pending)
        };
        let mut pass = Pass {
            looked_at: frontends.len(),
            full,
            ..Pass::default()
        };
        for frontend in frontends {
            let desired: BTreeSet<Cidr> = match external.frontends.get(&frontend) {
                Some(wanted) => wanted
                    .source_ranges
                    .iter()
                    .flat_map(|r| r.iter())
                    .copied()
                    .collect(),
                // While the source's view is incomplete, a frontend it
                // does not show may only be unseen yet.
                None if full && !self.owed.prune => continue,
                None => BTreeSet::new(),
            };
            let held = self.written.get(&frontend).cloned().unwrap_or_default();
            for &range in desired.difference(&held) {
                let Some(key) = frontend.source_range_key::<A>(range) else {
                    continue;
                };
                match self.trie.put(&key, &ADMITTED) {
                    Ok(()) => {
                        self.written.entry(frontend).or_default().insert(range);
                        pass.changes += 1;
                    }
                    Err(error) => {
                        warn!(table = self.name, %frontend, %range, %error, "cannot write a source range");
                        self.owed.pending.insert(frontend);
                        pass.failures += 1;
                    }
                }
            }
            self.leaving
                .extend(held.difference(&desired).map(|&range| (frontend, range)));
        }
        pass
    }

    /// Takes out the entries [`SourceRangeTable::add`] found no longer
    /// desired. Call after the tc frontend table's pass.
    pub fn remove_leaving(&mut self, added: Pass) -> Pass {
        let mut pass = added;
        for (frontend, range) in std::mem::take(&mut self.leaving) {
            let Some(key) = frontend.source_range_key::<A>(range) else {
                continue;
            };
            match self.trie.delete(&key) {
                Ok(()) => {
                    if let Some(ranges) = self.written.get_mut(&frontend) {
                        ranges.remove(&range);
                        if ranges.is_empty() {
                            self.written.remove(&frontend);
                        }
                    }
                    pass.changes += 1;
                }
                Err(error) => {
                    warn!(table = self.name, %frontend, %range, %error, "cannot delete a source range");
                    self.owed.pending.insert(frontend);
                    pass.failures += 1;
                }
            }
        }
        self.owed.retry.settle(self.name, pass.failures);
        pass
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc};

    use proxy_common::Ip4;

    use super::*;
    use crate::model::{ExternalFrontend, FrontendKind, Protocol, TrafficPolicy};

    /// The trie as a list of (prefix length, entry), as the kernel keeps it.
    #[derive(Default)]
    struct Trie {
        entries: Vec<(u32, SourceRange<Ip4>)>,
        refuse_writes: bool,
    }

    impl Table<Key<SourceRange<Ip4>>, u8> for Trie {
        fn put(&mut self, key: &Key<SourceRange<Ip4>>, _: &u8) -> Result<(), MapError> {
            if self.refuse_writes {
                return Err(MapError::KeyNotFound);
            }
            let entry = (key.prefix_len(), key.data());
            if !self.entries.contains(&entry) {
                self.entries.push(entry);
            }
            Ok(())
        }

        fn delete(&mut self, key: &Key<SourceRange<Ip4>>) -> Result<(), MapError> {
            let entry = (key.prefix_len(), key.data());
            self.entries.retain(|e| *e != entry);
            Ok(())
        }

        fn entries(&self) -> Result<Vec<(Key<SourceRange<Ip4>>, u8)>, MapError> {
            Ok(self
                .entries
                .iter()
                .map(|&(prefix_len, data)| (Key::new(prefix_len, data), ADMITTED))
                .collect())
        }
    }

    fn lb(ip: &str) -> L4Addr {
        L4Addr {
            ip: ip.parse::<IpAddr>().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn state(frontends: &[(L4Addr, Option<&[&str]>)]) -> ExternalState {
        let mut state = ExternalState::default();
        for &(addr, ranges) in frontends {
            state.frontends.insert(
                addr,
                ExternalFrontend {
                    service: "default/web:http".into(),
                    kind: FrontendKind::LoadBalancer,
                    policy: TrafficPolicy::Cluster,
                    backends: Arc::new([]),
                    cluster_backends: Arc::new([]),
                    affinity: 0,
                    source_ranges: ranges
                        .map(|ranges| ranges.iter().map(|r| r.parse().unwrap()).collect()),
                },
            );
        }
        state
    }

    fn held(table: &SourceRangeTable<Ip4, Trie>) -> Vec<(L4Addr, String)> {
        let mut out: Vec<(L4Addr, String)> = table
            .trie
            .entries()
            .unwrap()
            .iter()
            .filter_map(|(key, _)| L4Addr::from_source_range_key(key))
            .map(|(frontend, range)| (frontend, range.to_string()))
            .collect();
        out.sort();
        out
    }

    fn pass(table: &mut SourceRangeTable<Ip4, Trie>, state: &ExternalState) -> Pass {
        let added = table.add(state);
        table.remove_leaving(added)
    }

    #[test]
    fn ranges_follow_the_model_new_ones_in_before_old_ones_out() {
        let mut table = SourceRangeTable::adopt("test", Trie::default()).unwrap();
        let front = lb("192.0.2.10");
        table.owed.view(true);
        let pass1 = pass(&mut table, &state(&[(front, Some(&["10.255.77.0/30"]))]));
        assert_eq!((pass1.changes, pass1.failures), (1, 0));
        assert_eq!(held(&table), [(front, "10.255.77.0/30".to_owned())]);

        table.owed.changed([front]);
        let next = state(&[(front, Some(&["192.168.101.0/24"]))]);
        table.add(&next);
        // Between the two halves (the tc table's pass), both admit.
        assert_eq!(held(&table).len(), 2);
        table.remove_leaving(Pass::default());
        assert_eq!(held(&table), [(front, "192.168.101.0/24".to_owned())]);

        // The restriction lifted, and a frontend of the other family passed over.
        table.owed.changed([front, lb("fd00::10")]);
        pass(&mut table, &state(&[(front, None)]));
        assert!(held(&table).is_empty());
        assert_eq!(table.entries(), 0);
    }

    #[test]
    fn an_incomplete_view_keeps_what_it_does_not_show_and_failures_are_retried() {
        let mut trie = Trie::default();
        let kept = lb("192.0.2.20");
        trie.put(
            &kept
                .source_range_key::<Ip4>("10.0.0.0/8".parse().unwrap())
                .unwrap(),
            &ADMITTED,
        )
        .unwrap();
        let mut table = SourceRangeTable::adopt("test", trie).unwrap();
        assert_eq!(table.entries(), 1);
        table.owed.view(false);
        pass(&mut table, &state(&[]));
        assert_eq!(
            table.entries(),
            1,
            "not deleted while the view is incomplete"
        );

        let front = lb("192.0.2.10");
        table.trie.refuse_writes = true;
        table.owed.changed([front]);
        let failed = pass(&mut table, &state(&[(front, Some(&["10.1.0.0/16"]))]));
        assert_eq!(failed.failures, 1);
        let retry_at = table.owed.retry_at().expect("a retry is due");
        assert!(!table.owed.has_work(), "held back until the retry");
        table.trie.refuse_writes = false;
        table.owed.wake(retry_at);
        assert!(table.owed.has_work());
        let retried = pass(&mut table, &state(&[(front, Some(&["10.1.0.0/16"]))]));
        assert_eq!((retried.changes, retried.failures), (1, 0));
        assert_eq!(table.owed.retry_at(), None);
    }
}
