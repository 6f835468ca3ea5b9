//! Where the datapath is attached, and its guard: the cgroup programs once
//! the maps are filled, the tc programs on the devices the NodePort
//! addresses choose, and, from then on, a watch on the pins and the cgroup
//! that puts back whatever goes from under them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};

use crate::{
    datapath::{Datapath, DatapathError, GuardWatch},
    devices::{DeviceRole, DeviceWatch, Interface},
};

/// The loaded datapath and where it is attached.
pub struct Attachment {
    datapath: Datapath,
    /// Whether the cgroup programs are attached yet; devices wait for it.
    attached: bool,
    devices: DeviceWatch,
    /// Devices chosen but not yet attached to, each with its role.
    devices_wanted: Option<BTreeMap<String, DeviceRole>>,
    /// Every interface of the namespace, as last read: where clsact
    /// filters may have to be taken off.
    interface_names: Vec<String>,
    /// The pin directory and the cgroup's parent, followed with inotify
    /// once attached.
    watch: Option<GuardWatch>,
    /// What the guard last found wrong with the datapath.
    problem: Option<String>,
}

impl Attachment {
    #[must_use]
    pub fn new(datapath: Datapath, devices: DeviceWatch) -> Self {
        Self {
            datapath,
            attached: false,
            devices,
            devices_wanted: None,
            interface_names: Vec::new(),
            watch: None,
            problem: None,
        }
    }

    #[must_use]
    pub const fn is_attached(&self) -> bool {
        self.attached
    }

    /// Attaches the cgroup programs and starts guarding them: a change
    /// under `pins` or to `cgroup` is a unit on `changes`. The tc programs
    /// follow with the next [`Attachment::follow_devices`].
    pub fn attach(
        &mut self,
        cgroup: &Path,
        pins: &Path,
        changes: &UnboundedSender<()>,
    ) -> Result<(), DatapathError> {
        self.datapath.attach(cgroup)?;
        self.attached = true;
        match GuardWatch::start(pins, cgroup, changes.clone()) {
            Ok(watch) => self.watch = Some(watch),
            Err(error) => {
                warn!(%error, "cannot follow the pin directory and the cgroup with inotify; they are looked at every --iptables-sync-period");
            }
        }
        info!("datapath ready");
        Ok(())
    }

    /// The node's interfaces as last read: the tc programs follow the
    /// devices that `node_addresses` (the NodePort addresses) choose.
    pub fn follow_devices(
        &mut self,
        interfaces: Vec<Interface>,
        node_addresses: &BTreeSet<IpAddr>,
    ) {
        if let Some(devices) = self.devices.update(&interfaces, node_addresses) {
            self.devices_wanted = Some(devices.clone());
        }
        self.interface_names = interfaces.into_iter().map(|i| i.name).collect();
        self.attach_devices();
    }

    /// Attaches the tc programs to the devices last chosen, once the cgroup
    /// programs are attached.
    fn attach_devices(&mut self) {
        if self.attached
            && let Some(devices) = self.devices_wanted.take()
        {
            self.datapath
                .attach_devices(&devices, &self.interface_names);
        }
    }

    /// Puts back what went from under the datapath (pins, the pin
    /// directory, the cgroup's links), and logs when what is wrong changes.
    pub fn guard(&mut self) {
        if !self.attached {
            return;
        }
        let report = self.datapath.guard();
        if report.repaired
            && let Some(watch) = &mut self.watch
            && let Err(error) = watch.follow_pins()
        {
            warn!(%error, "cannot follow the pin directory made again");
        }
        if report.problem == self.problem {
            if report.repaired {
                info!("the datapath is pinned again");
            }
            return;
        }
        if let Some(problem) = &report.problem {
            error!("{problem}; /healthz answers 503");
        } else {
            info!("the datapath is attached and pinned again");
        }
        self.problem = report.problem;
    }

    /// What the guard last found wrong: the datapath is not attached where
    /// it should be.
    #[must_use]
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }
}
