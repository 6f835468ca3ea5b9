use std::{cell::RefCell, net::Ipv4Addr, rc::Rc};

use super::*;
use crate::model::{DesiredFrontend, L4Addr, Protocol};
use crate::testing::XorShift;

/// Both maps as the kernel holds them, shared by the two tables so every
/// single write can be checked against what a concurrent reader would see.
#[derive(Default)]
pub(crate) struct Kernel {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    /// How many entries the services map takes before it is full.
    pub(crate) services_capacity: Option<usize>,
}

impl Kernel {
    /// What a program may read at any instant: a count never points past the
    /// slots, and a slot never points at a missing backend.
    fn assert_readable(&self) {
        for (key, value) in &self.services {
            if key.backend_slot == 0 {
                for slot in 1..=value.count {
                    let value = self.services.get(&key.slot(slot));
                    let value = value.unwrap_or_else(|| panic!("{key:?}: slot {slot} missing"));
                    let id = value.backend_id;
                    let backend = self.backends.get(&id);
                    let backend =
                        backend.unwrap_or_else(|| panic!("{key:?}: backend {id} missing"));
                    // The programs read the slot's copy of the address.
                    assert_eq!(
                        (value.addr_be, value.port_be),
                        (backend.addr_be, backend.port_be),
                        "{key:?}: slot {slot} disagrees with backend {id}"
                    );
                    assert_ne!(value.addr_be, 0, "{key:?}: slot {slot} has no address");
                }
            }
        }
    }

    /// Frontend → backend addresses in slot order, whatever the ids.
    pub(crate) fn view(&self) -> BTreeMap<L4Addr, Vec<L4Addr>> {
        let mut view = BTreeMap::new();
        for (key, value) in &self.services {
            if key.backend_slot == 0 {
                let backends = (1..=value.count)
                    .map(|slot| {
                        let id = self.services[&key.slot(slot)].backend_id;
                        L4Addr::from_backend(self.backends[&id]).unwrap()
                    })
                    .collect();
                view.insert(L4Addr::from_service_key(key).unwrap(), backends);
            }
        }
        view
    }
}

pub(crate) struct Services(pub(crate) Rc<RefCell<Kernel>>);
pub(crate) struct Backends(pub(crate) Rc<RefCell<Kernel>>);

impl Table<ServiceKey, ServiceValue> for Services {
    fn put(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        let mut kernel = self.0.borrow_mut();
        let full = kernel
            .services_capacity
            .is_some_and(|capacity| kernel.services.len() >= capacity);
        if full && !kernel.services.contains_key(key) {
            // The kernel says E2BIG; any error will do for the writer.
            return Err(MapError::KeyNotFound);
        }
        kernel.services.insert(*key, *value);
        kernel.assert_readable();
        Ok(())
    }

    fn delete(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        let mut kernel = self.0.borrow_mut();
        kernel.services.remove(key);
        kernel.assert_readable();
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(self
            .0
            .borrow()
            .services
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }
}

impl Table<u32, Backend> for Backends {
    fn put(&mut self, key: &u32, value: &Backend) -> Result<(), MapError> {
        let mut kernel = self.0.borrow_mut();
        kernel.backends.insert(*key, *value);
        kernel.assert_readable();
        Ok(())
    }

    fn delete(&mut self, key: &u32) -> Result<(), MapError> {
        let mut kernel = self.0.borrow_mut();
        kernel.backends.remove(key);
        kernel.assert_readable();
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        Ok(self
            .0
            .borrow()
            .backends
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }
}

fn writer(kernel: &Rc<RefCell<Kernel>>) -> MapWriter<proxy_common::Ip4, Services, Backends> {
    MapWriter::adopt(Services(kernel.clone()), Backends(kernel.clone())).unwrap()
}

pub(crate) fn tcp(host: u8, port: u16) -> L4Addr {
    L4Addr {
        ip: Ipv4Addr::new(10, 0, 0, host).into(),
        port,
        protocol: Protocol::Tcp,
    }
}

pub(crate) fn state(frontends: &[(L4Addr, &[L4Addr])]) -> DesiredState {
    DesiredState {
        frontends: frontends
            .iter()
            .map(|(frontend, backends)| {
                let entry = DesiredFrontend {
                    service: format!("test/{frontend}"),
                    backends: backends.to_vec().into(),
                    flags: 0,
                    affinity: 0,
                };
                (*frontend, entry)
            })
            .collect(),
    }
}

fn view_of(desired: &DesiredState) -> BTreeMap<L4Addr, Vec<L4Addr>> {
    desired
        .frontends
        .iter()
        .map(|(k, v)| (*k, v.backends.to_vec()))
        .collect()
}

#[test]
fn writes_everything_once_then_nothing() {
    let kernel = Rc::default();
    let mut writer = writer(&kernel);
    let desired = state(&[
        (tcp(100, 80), &[tcp(1, 8080), tcp(2, 8080)]),
        (tcp(101, 53), &[]),
    ]);
    let stats = writer.apply_all(&desired, true);
    // Two backends, two slots and two slot-0 entries.
    assert_eq!((stats.writes, stats.deletes, stats.failures()), (6, 0, 0));
    assert_eq!(kernel.borrow().view(), view_of(&desired));
    assert_eq!(writer.apply_all(&desired, true).changes(), 0);
}

#[test]
fn a_restarted_writer_adopts_the_maps_and_changes_nothing() {
    let kernel = Rc::default();
    let desired = state(&[(tcp(100, 80), &[tcp(1, 8080), tcp(2, 8080), tcp(3, 8080)])]);
    writer(&kernel).apply_all(&desired, true);
    let mut restarted = writer(&kernel);
    assert_eq!(restarted.sizes(), (1, 3));
    assert_eq!(restarted.apply_all(&desired, true).changes(), 0);
}

#[test]
fn session_affinity_is_slot_zeros_and_survives_a_restart() {
    let kernel = Rc::default();
    let frontend = tcp(100, 80);
    let mut desired = state(&[(frontend, &[tcp(1, 8080), tcp(2, 8080)])]);
    writer(&kernel).apply_all(&desired, true);
    desired.frontends.get_mut(&frontend).unwrap().affinity = 10_800;
    let mut restarted = writer(&kernel);
    // Only slot 0 changes, and then nothing, even after a restart.
    assert_eq!(restarted.apply_all(&desired, true).writes, 1);
    assert_eq!(
        kernel.borrow().services[&frontend.service_key().unwrap()].backend_id,
        10_800
    );
    assert_eq!(writer(&kernel).apply_all(&desired, true).changes(), 0);
}

#[test]
fn slots_deleted_or_given_another_backend_are_reported_once() {
    let kernel = Rc::default();
    let mut writer = writer(&kernel);
    let frontend = tcp(100, 80);
    writer.apply_all(&state(&[(frontend, &[tcp(1, 8080), tcp(2, 8080)])]), true);
    assert_eq!(writer.take_slots_gone(), [], "new slots end no count");
    // tcp(1) goes: tcp(2) moves into slot 1, and slot 2 is deleted.
    writer.apply_all(&state(&[(frontend, &[tcp(2, 8080)])]), true);
    let key = frontend.service_key().unwrap();
    assert_eq!(writer.take_slots_gone(), [key.slot(1), key.slot(2)]);
    assert_eq!(writer.take_slots_gone(), []);
    writer.apply_all(&state(&[]), true);
    assert_eq!(writer.take_slots_gone(), [key.slot(1)]);
}

#[test]
fn backends_are_shared_by_id_and_removed_when_unused() {
    let kernel: Rc<RefCell<Kernel>> = Rc::default();
    let mut writer = writer(&kernel);
    let shared = tcp(1, 8080);
    writer.apply_all(
        &state(&[(tcp(100, 80), &[shared]), (tcp(101, 80), &[shared])]),
        true,
    );
    assert_eq!(kernel.borrow().backends.len(), 1);
    writer.apply_all(&state(&[(tcp(101, 80), &[tcp(2, 8080)])]), true);
    let kernel = kernel.borrow();
    assert_eq!(
        kernel.backends.values().copied().collect::<Vec<_>>(),
        [tcp(2, 8080).backend().unwrap()]
    );
    assert_eq!(kernel.services.len(), 2);
}

#[test]
fn a_deleted_backend_id_is_not_handed_to_a_new_backend() {
    let kernel: Rc<RefCell<Kernel>> = Rc::default();
    let mut writer = writer(&kernel);
    writer.apply_all(&state(&[(tcp(100, 80), &[tcp(1, 80), tcp(2, 80)])]), true);
    writer.apply_all(&state(&[(tcp(100, 80), &[tcp(1, 80)])]), true);
    writer.apply_all(&state(&[(tcp(100, 80), &[tcp(1, 80), tcp(3, 80)])]), true);
    let ids: Vec<u32> = kernel.borrow().backends.keys().copied().collect();
    assert_eq!(ids, [1, 3]);
}

#[test]
fn a_frontend_that_does_not_fit_leaves_no_slots_behind_and_the_others_are_written() {
    let kernel: Rc<RefCell<Kernel>> = Rc::default();
    kernel.borrow_mut().services_capacity = Some(8);
    let mut writer = writer(&kernel);
    let big: Vec<L4Addr> = (1..=10).map(|host| tcp(host, 80)).collect();
    let desired = state(&[(tcp(100, 80), &big), (tcp(101, 80), &[tcp(11, 80)])]);
    let stats = writer.apply_all(&desired, true);
    assert_eq!(stats.failures(), 1);
    let view = kernel.borrow().view();
    assert_eq!(view.keys().copied().collect::<Vec<_>>(), [tcp(101, 80)]);
    assert_eq!(
        kernel.borrow().services.len(),
        2,
        "the big frontend left slots behind"
    );
    // Once the map is bigger, the next apply catches up.
    kernel.borrow_mut().services_capacity = None;
    assert_eq!(writer.apply_all(&desired, true).failures(), 0);
    assert_eq!(kernel.borrow().view(), view_of(&desired));
}

#[test]
fn any_sequence_of_states_ends_as_if_written_from_scratch() {
    let mut rng = XorShift(0x5eed);
    let kernel = Rc::default();
    let mut incremental = writer(&kernel);
    let mut previous = DesiredState::default();
    for round in 0..300 {
        let mut frontends = Vec::new();
        for service in 0..rng.below(6) {
            let backends: Vec<L4Addr> = (0..rng.below(5))
                .map(|_| tcp(u8::try_from(rng.below(8)).unwrap(), 8080))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            frontends.push((tcp(100 + u8::try_from(service).unwrap(), 80), backends));
        }
        let desired = state(
            &frontends
                .iter()
                .map(|(f, b)| (*f, b.as_slice()))
                .collect::<Vec<_>>(),
        );
        // Now and then the agent restarts and adopts the maps, and writes
        // everything; otherwise it writes only the frontends that changed.
        if round % 37 == 0 {
            incremental = writer(&kernel);
            incremental.apply_all(&desired, true);
        } else {
            let changed: BTreeSet<L4Addr> = previous
                .frontends
                .keys()
                .chain(desired.frontends.keys())
                .filter(|f| previous.frontends.get(f) != desired.frontends.get(f))
                .copied()
                .collect();
            incremental.apply_changed(&desired, &changed);
        }
        previous = desired.clone();
        let scratch: Rc<RefCell<Kernel>> = Rc::default();
        writer(&scratch).apply_all(&desired, true);
        assert_eq!(
            kernel.borrow().view(),
            scratch.borrow().view(),
            "round {round}"
        );
        assert_eq!(kernel.borrow().view(), view_of(&desired), "round {round}");
        let live: BTreeSet<u32> = kernel
            .borrow()
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot > 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        assert_eq!(
            live.len(),
            kernel.borrow().backends.len(),
            "round {round}: unused backends left"
        );
    }
}
