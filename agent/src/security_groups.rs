//! Security groups, kept by the node in `security_groups.json` and applied on OVN: each is a port group
//! (`qx_sg_<name>`) with the ACLs [`qx_net::ovn::security_group`] renders. VM NICs on `ovn` networks name groups in
//! their spec (`security_groups`); their logical ports join the port groups in the transaction that creates them
//! (see `Networks::attach_nic`), so rule changes reach running VMs at once.
//!
//! Every change writes the northbound database first (one transaction, all or nothing) and the file second; if
//! the file cannot be written the database is put back, so a failed change leaves both as they were.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qx_common::{FieldError, ValidationErrors};
use qx_net::ovn::security_group::{port_group_name, KEY_GROUP};
use qx_net::ovn::{Northbound, Rule, SecurityGroup};
use qx_vmm::persist::write_atomic;
use tracing::{info, warn};

use crate::grpc::error_chain;
use crate::network::{NetworkError, Networks};

#[derive(Debug, thiserror::Error)]
pub enum SecurityGroupError {
    #[error("invalid security group: {0}")]
    Invalid(ValidationErrors),
    #[error("security group {0:?} not found")]
    NotFound(String),
    #[error("security group {0:?} already exists")]
    AlreadyExists(String),
    /// `users`: the VMs whose NICs name the group, and the groups whose rules do.
    #[error("security group {name:?} is used by {users}")]
    InUse { name: String, users: String },
    #[error("security group {group:?} has no rule {id}")]
    RuleNotFound { group: String, id: u32 },
    /// OVN is not configured or not reachable.
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("OVN refused the change to security group {name:?}")]
    Ovn {
        name: String,
        #[source]
        source: qx_net::ovn::Error,
    },
    #[error("cannot write {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The node's security groups.
#[derive(Debug)]
pub struct SecurityGroups {
    file: PathBuf,
    groups: Mutex<BTreeMap<String, SecurityGroup>>,
    /// One change at a time: each is a database write and a file write that must not interleave with another's.
    changes: tokio::sync::Mutex<()>,
}

impl SecurityGroups {
    /// Reads `<data_dir>/security_groups.json` (none yet: no groups).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let file = data_dir.join("security_groups.json");
        let list: Vec<SecurityGroup> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let groups = list.into_iter().map(|g| (g.name.clone(), g)).collect();
        Ok(Self { file, groups: Mutex::new(groups), changes: tokio::sync::Mutex::new(()) })
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SecurityGroup>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<SecurityGroup> {
        self.groups().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<SecurityGroup> {
        self.groups().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.groups().contains_key(name)
    }

    /// Creates a group with its rules (ids assigned 1, 2, ...) and its port group. A port group of that name
    /// already in OVN (another node's group of the same name) is taken over with this group's rules.
    pub async fn create(
        &self,
        networks: &Networks,
        mut group: SecurityGroup,
    ) -> Result<SecurityGroup, SecurityGroupError> {
        for (i, rule) in group.rules.iter_mut().enumerate() {
            rule.id = i as u32 + 1;
        }
        let _change = self.changes.lock().await;
        group.validate().map_err(SecurityGroupError::Invalid)?;
        self.check_remotes(&group, "rules", &group.rules).map_err(SecurityGroupError::Invalid)?;
        if self.contains(&group.name) {
            return Err(SecurityGroupError::AlreadyExists(group.name));
        }
        let nb = networks.northbound().await?;
        let existed = nb.port_group(&group.port_group()).is_some();
        apply(&nb, &group).await?;
        let mut groups = self.groups().clone();
        groups.insert(group.name.clone(), group.clone());
        if let Err(e) = self.persist(&groups).await {
            if !existed {
                if let Err(undo) = nb.delete_port_group(&group.port_group()).await {
                    warn!(group = %group.name, error = %error_chain(&undo), "cannot remove the port group again");
                }
            }
            return Err(e);
        }
        *self.groups() = groups;
        info!(group = %group.name, rules = group.rules.len(), adopted = existed, "security group created");
        Ok(group)
    }

    /// Deletes a group no VM NIC (`vms`: the VMs whose NICs name it) and no other group's rule names, with its
    /// port group and ACLs.
    pub async fn delete(&self, networks: &Networks, name: &str, vms: Vec<String>) -> Result<(), SecurityGroupError> {
        let _change = self.changes.lock().await;
        let group = self.get(name).ok_or_else(|| SecurityGroupError::NotFound(name.to_owned()))?;
        let referring: Vec<String> = self
            .groups()
            .values()
            .filter(|g| g.name != name && g.remote_groups().any(|r| r == name))
            .map(|g| g.name.clone())
            .collect();
        if !vms.is_empty() || !referring.is_empty() {
            let mut users = Vec::new();
            if !vms.is_empty() {
                users.push(format!("VMs {vms:?}"));
            }
            if !referring.is_empty() {
                users.push(format!("the rules of security groups {referring:?}"));
            }
            return Err(SecurityGroupError::InUse { name: name.to_owned(), users: users.join(" and ") });
        }
        let nb = networks.northbound().await?;
        nb.delete_port_group(&group.port_group())
            .await
            .map_err(|source| SecurityGroupError::Ovn { name: name.to_owned(), source })?;
        let mut groups = self.groups().clone();
        groups.remove(name);
        if let Err(e) = self.persist(&groups).await {
            if let Err(undo) = apply(&nb, &group).await {
                warn!(group = %name, error = %error_chain(&undo), "cannot restore the port group");
            }
            return Err(e);
        }
        *self.groups() = groups;
        info!(group = %name, "security group deleted");
        Ok(())
    }

    /// Adds a rule (its id assigned) and applies it at once, also to running VMs.
    pub async fn add_rule(
        &self,
        networks: &Networks,
        name: &str,
        mut rule: Rule,
    ) -> Result<SecurityGroup, SecurityGroupError> {
        let _change = self.changes.lock().await;
        let old = self.get(name).ok_or_else(|| SecurityGroupError::NotFound(name.to_owned()))?;
        let mut p = qx_common::Problems::default();
        rule.validate_into(&mut p, "rule.");
        p.into_result().map_err(SecurityGroupError::Invalid)?;
        self.check_remotes(&old, "rule", std::slice::from_ref(&rule)).map_err(SecurityGroupError::Invalid)?;
        rule.id = old.next_rule_id();
        let mut new = old.clone();
        new.rules.push(rule);
        self.change(networks, old, new).await
    }

    /// Deletes rule `id`, at once, also for running VMs.
    pub async fn delete_rule(
        &self,
        networks: &Networks,
        name: &str,
        id: u32,
    ) -> Result<SecurityGroup, SecurityGroupError> {
        let _change = self.changes.lock().await;
        let old = self.get(name).ok_or_else(|| SecurityGroupError::NotFound(name.to_owned()))?;
        let mut new = old.clone();
        new.rules.retain(|r| r.id != id);
        if new.rules.len() == old.rules.len() {
            return Err(SecurityGroupError::RuleNotFound { group: name.to_owned(), id });
        }
        self.change(networks, old, new).await
    }

    /// Makes sure the port group of `name` is in OVN (a database recreated since, say), before a port joins it.
    pub async fn ensure(&self, nb: &Northbound, name: &str) -> Result<(), SecurityGroupError> {
        let group = self.get(name).ok_or_else(|| SecurityGroupError::NotFound(name.to_owned()))?;
        if nb.port_group(&group.port_group()).is_none() {
            warn!(group = %name, "the port group is missing from OVN; creating it again");
            apply(nb, &group).await?;
        }
        Ok(())
    }

    /// Replaces `old` by `new` in OVN and on disk, or in neither.
    async fn change(
        &self,
        networks: &Networks,
        old: SecurityGroup,
        new: SecurityGroup,
    ) -> Result<SecurityGroup, SecurityGroupError> {
        let nb = networks.northbound().await?;
        apply(&nb, &new).await?;
        let mut groups = self.groups().clone();
        groups.insert(new.name.clone(), new.clone());
        if let Err(e) = self.persist(&groups).await {
            if let Err(undo) = apply(&nb, &old).await {
                warn!(group = %old.name, error = %error_chain(&undo), "cannot put the old rules back");
            }
            return Err(e);
        }
        *self.groups() = groups;
        info!(group = %new.name, rules = new.rules.len(), "security group rules applied");
        Ok(new)
    }

    /// Every rule's remote group must exist (or be `group` itself).
    fn check_remotes(&self, group: &SecurityGroup, field: &str, rules: &[Rule]) -> Result<(), ValidationErrors> {
        let groups = self.groups();
        let many = field == "rules";
        let problems: Vec<FieldError> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                let remote = rule.remote_group.as_ref()?;
                (remote != &group.name && !groups.contains_key(remote)).then(|| FieldError {
                    field: if many { format!("{field}[{i}].remote_group") } else { format!("{field}.remote_group") },
                    value: remote.clone(),
                    problem: "does not exist on this node".into(),
                })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(problems))
        }
    }

    async fn persist(&self, groups: &BTreeMap<String, SecurityGroup>) -> Result<(), SecurityGroupError> {
        let list: Vec<&SecurityGroup> = groups.values().collect();
        let json = serde_json::to_vec_pretty(&list).expect("security groups always serialize");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_atomic(&file, &json))
            .await
            .expect("persist task panicked")
            .map_err(|source| SecurityGroupError::Persist { path: self.file.clone(), source })
    }
}

/// Writes `group`'s port group and ACLs to OVN: replaces the ACLs of its port group, or creates it with them.
async fn apply(nb: &Northbound, group: &SecurityGroup) -> Result<(), SecurityGroupError> {
    let pg = port_group_name(&group.name);
    let acls = group.acls();
    let ovn = |source| SecurityGroupError::Ovn { name: group.name.clone(), source };
    if nb.port_group(&pg).is_some() {
        nb.set_port_group_acls(&pg, &acls).await.map_err(ovn)?;
    } else {
        let ids = BTreeMap::from([(KEY_GROUP.to_owned(), group.name.clone())]);
        nb.create_port_group_with_acls(&pg, &ids, &acls).await.map_err(ovn)?;
    }
    Ok(())
}
