//! Security groups: named sets of allow rules for VM ports, and how they become OVN ACLs.
//!
//! A group is an OVN port group (`qx_sg_<name>`) whose ACLs are, like OpenStack's and Incus's:
//! - a default drop of all IP traffic to and from its ports (priority [`DROP_PRIORITY`]), so a port in any group
//!   only passes what some group of it allows;
//! - DHCPv4 requests to OVN's native DHCP, always allowed (priority [`ALLOW_PRIORITY`]): addresses keep coming;
//! - one `allow-related` ACL per rule (priority [`ALLOW_PRIORITY`]): the rule's traffic and, through conntrack,
//!   its replies. A port in several groups passes the union of their rules, since every allow outranks every drop.
//!
//! Rules are IPv4: `ingress` (to the VM: `to-lport`, matching `outport`) or `egress` (from the VM: `from-lport`,
//! matching `inport`), a protocol, an optional port range, and the remote end as a CIDR or another group (the
//! addresses of its ports: the `$qx_sg_<name>_ip4` address set northd keeps for every port group).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::spec::{check_port_group_name, AclAction, AclDirection, AclSpec, Ipv4Cidr, MAX_NAME_LEN};
use crate::names::{Problems, ValidationErrors};

/// Priority of a group's default drop ACLs.
pub const DROP_PRIORITY: u16 = 1000;
/// Priority of a group's allow ACLs (its rules and the DHCP exception): above every drop.
pub const ALLOW_PRIORITY: u16 = 1001;
/// What port group names start with; the rest is the group's name.
pub const PORT_GROUP_PREFIX: &str = "qx_sg_";
/// The `external_ids` key naming the group an ACL or port group renders.
pub const KEY_GROUP: &str = "qx-sg";
/// The `external_ids` key naming the rule (its id) an ACL renders; `default-drop` and `dhcp` for the others.
pub const KEY_RULE: &str = "qx-sg-rule";

/// The port group of security group `name`.
pub fn port_group_name(name: &str) -> String {
    format!("{PORT_GROUP_PREFIX}{name}")
}

/// Checks a security group name: 1..=57 ASCII letters, digits and `_`, starting with a letter (it becomes the
/// port group `qx_sg_<name>`, which OVN matches name as `@qx_sg_<name>`).
pub fn check_group_name(name: &str) -> Result<(), String> {
    let max = MAX_NAME_LEN - PORT_GROUP_PREFIX.len();
    if name.len() > max {
        return Err(format!("is longer than {max} bytes"));
    }
    check_port_group_name(name)
}

/// Which way a rule lets traffic through, seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// To the VM, from the remote end.
    Ingress,
    /// From the VM, to the remote end.
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IP protocol a rule allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Every IPv4 protocol.
    #[default]
    Any,
    Tcp,
    Udp,
    /// ICMPv4 (all types).
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_any(protocol: &Protocol) -> bool {
    *protocol == Protocol::Any
}

/// One allow rule of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique in its group, assigned when the rule is added (1, 2, ...); what deleting a rule names.
    #[serde(default)]
    pub id: u32,
    pub direction: Direction,
    /// Default: any.
    #[serde(default, skip_serializing_if = "is_any")]
    pub protocol: Protocol,
    /// tcp and udp: the first destination port, 1..=65535; none: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_min: Option<u16>,
    /// tcp and udp: the last destination port, at least `port_min`; none: `port_min` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_max: Option<u16>,
    /// The remote end's addresses (the source of ingress, the destination of egress); none (and no
    /// `remote_group`): anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_cidr: Option<Ipv4Cidr>,
    /// The remote end is the ports of this security group (which must exist; it may be the rule's own group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_group: Option<String>,
}

impl Rule {
    /// A rule allowing every protocol in `direction` from or to anywhere.
    pub fn new(direction: Direction) -> Self {
        Self {
            id: 0,
            direction,
            protocol: Protocol::Any,
            port_min: None,
            port_max: None,
            remote_cidr: None,
            remote_group: None,
        }
    }

    /// Every problem that needs no other group, under `prefix` (`rules[2].`).
    pub fn validate_into(&self, p: &mut Problems, prefix: &str) {
        let field = |f: &str| format!("{prefix}{f}");
        if !self.protocol.has_ports() {
            for (name, port) in [("port_min", self.port_min), ("port_max", self.port_max)] {
                if let Some(port) = port {
                    p.add(field(name), port, format!("is only for protocols tcp and udp, not {}", self.protocol));
                }
            }
        } else {
            match (self.port_min, self.port_max) {
                (Some(0), _) => p.add(field("port_min"), 0, "is not a port (1 to 65535)"),
                (None, Some(max)) => p.add(field("port_max"), max, "needs port_min"),
                (Some(min), Some(max)) if max < min => {
                    p.add(field("port_max"), max, format!("is below port_min {min}"))
                }
                _ => {}
            }
        }
        if let (Some(cidr), Some(group)) = (self.remote_cidr, &self.remote_group) {
            p.add(field("remote_group"), group, format!("and remote_cidr {cidr} are both given; name one"));
        } else if let Some(group) = &self.remote_group {
            p.check(field("remote_group"), group, check_group_name(group));
        }
    }

    /// The rule's ACL on port group `pg`.
    fn acl(&self, group: &str) -> AclSpec {
        let pg = port_group_name(group);
        let (direction, port, remote) = match self.direction {
            Direction::Ingress => (AclDirection::ToLport, "outport", "ip4.src"),
            Direction::Egress => (AclDirection::FromLport, "inport", "ip4.dst"),
        };
        let mut m = format!("{port} == @{pg} && ip4");
        if let Some(cidr) = self.remote_cidr {
            m.push_str(&format!(" && {remote} == {cidr}"));
        }
        if let Some(other) = &self.remote_group {
            m.push_str(&format!(" && {remote} == ${}_ip4", port_group_name(other)));
        }
        match self.protocol {
            Protocol::Any => {}
            Protocol::Icmp => m.push_str(" && icmp4"),
            Protocol::Tcp | Protocol::Udp => {
                let proto = self.protocol.as_str();
                m.push_str(&format!(" && {proto}"));
                match (self.port_min, self.port_max) {
                    (Some(min), Some(max)) if max > min => {
                        m.push_str(&format!(" && {proto}.dst >= {min} && {proto}.dst <= {max}"))
                    }
                    (Some(min), _) => m.push_str(&format!(" && {proto}.dst == {min}")),
                    (None, _) => {}
                }
            }
        }
        AclSpec {
            direction,
            priority: ALLOW_PRIORITY,
            match_: m,
            action: AclAction::AllowRelated,
            external_ids: ids(group, &self.id.to_string()),
        }
    }
}

impl fmt::Display for Rule {
    /// `ingress tcp 8080-8090 from 10.0.0.0/8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.direction, self.protocol)?;
        match (self.port_min, self.port_max) {
            (Some(min), Some(max)) if max != min => write!(f, " {min}-{max}")?,
            (Some(min), _) => write!(f, " {min}")?,
            (None, _) => {}
        }
        let way = if self.direction == Direction::Ingress { "from" } else { "to" };
        match (&self.remote_cidr, &self.remote_group) {
            (Some(cidr), _) => write!(f, " {way} {cidr}"),
            (None, Some(group)) => write!(f, " {way} group {group}"),
            (None, None) => write!(f, " {way} anywhere"),
        }
    }
}

fn ids(group: &str, rule: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(KEY_GROUP.to_owned(), group.to_owned()), (KEY_RULE.to_owned(), rule.to_owned())])
}

/// A named set of rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

impl SecurityGroup {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), description: String::new(), rules: Vec::new() }
    }

    /// Every problem that needs no other group, with the field and the value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        p.check("name", &self.name, check_group_name(&self.name));
        if self.description.len() > 255 || self.description.contains(['\n', '\r', '\0']) {
            p.add("description", &self.description, "is longer than 255 bytes or holds control characters");
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate_into(&mut p, &format!("rules[{i}]."));
        }
        p.into_result()
    }

    /// Its port group's name.
    pub fn port_group(&self) -> String {
        port_group_name(&self.name)
    }

    /// The port group's ACLs: the default drops, the DHCP exception, then one per rule in order.
    pub fn acls(&self) -> Vec<AclSpec> {
        let pg = self.port_group();
        let acl = |direction, priority, m: String, action, rule: &str| AclSpec {
            direction,
            priority,
            match_: m,
            action,
            external_ids: ids(&self.name, rule),
        };
        let mut acls = vec![
            acl(
                AclDirection::ToLport,
                DROP_PRIORITY,
                format!("outport == @{pg} && ip"),
                AclAction::Drop,
                "default-drop",
            ),
            acl(
                AclDirection::FromLport,
                DROP_PRIORITY,
                format!("inport == @{pg} && ip"),
                AclAction::Drop,
                "default-drop",
            ),
            acl(
                AclDirection::FromLport,
                ALLOW_PRIORITY,
                format!("inport == @{pg} && ip4 && udp && udp.src == 68 && udp.dst == 67"),
                AclAction::Allow,
                "dhcp",
            ),
        ];
        acls.extend(self.rules.iter().map(|rule| rule.acl(&self.name)));
        acls
    }

    /// The groups its rules name as their remote end.
    pub fn remote_groups(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|r| r.remote_group.as_deref())
    }

    /// The id the next rule gets: one above the highest so far.
    pub fn next_rule_id(&self) -> u32 {
        self.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(err: ValidationErrors) -> Vec<String> {
        err.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn groups_render_drops_dhcp_and_one_allow_related_acl_per_rule() {
        let mut group = SecurityGroup::new("web");
        group.rules = vec![
            Rule {
                id: 1,
                protocol: Protocol::Icmp,
                remote_cidr: Some("10.0.0.0/8".parse().unwrap()),
                ..Rule::new(Direction::Ingress)
            },
            Rule { id: 2, protocol: Protocol::Tcp, port_min: Some(8080), ..Rule::new(Direction::Ingress) },
            Rule {
                id: 3,
                protocol: Protocol::Udp,
                port_min: Some(1000),
                port_max: Some(2000),
                remote_group: Some("db".into()),
                ..Rule::new(Direction::Egress)
            },
            Rule { id: 4, ..Rule::new(Direction::Egress) },
        ];
        group.validate().unwrap();
        let rendered: Vec<String> = group
            .acls()
            .iter()
            .map(|a| format!("{} {} {} {}", a.direction.as_str(), a.priority, a.match_, a.action.as_str()))
            .collect();
        assert_eq!(
            rendered,
            [
                "to-lport 1000 outport == @qx_sg_web && ip drop",
                "from-lport 1000 inport == @qx_sg_web && ip drop",
                "from-lport 1001 inport == @qx_sg_web && ip4 && udp && udp.src == 68 && udp.dst == 67 allow",
                "to-lport 1001 outport == @qx_sg_web && ip4 && ip4.src == 10.0.0.0/8 && icmp4 allow-related",
                "to-lport 1001 outport == @qx_sg_web && ip4 && tcp && tcp.dst == 8080 allow-related",
                "from-lport 1001 inport == @qx_sg_web && ip4 && ip4.dst == $qx_sg_db_ip4 && udp && udp.dst >= 1000 \
                 && udp.dst <= 2000 allow-related",
                "from-lport 1001 inport == @qx_sg_web && ip4 allow-related",
            ]
        );
        assert_eq!(group.acls()[4].external_ids[KEY_RULE], "2");
        assert_eq!(group.acls()[4].external_ids[KEY_GROUP], "web");
        assert_eq!(group.next_rule_id(), 5);
        assert_eq!(group.remote_groups().collect::<Vec<_>>(), ["db"]);
        assert_eq!(group.rules[2].to_string(), "egress udp 1000-2000 to group db");
        assert_eq!(group.rules[0].to_string(), "ingress icmp from 10.0.0.0/8");
    }

    #[test]
    fn bad_rules_are_named_by_field() {
        let mut group = SecurityGroup::new("bad-name");
        group.rules = vec![
            Rule { protocol: Protocol::Tcp, port_min: Some(0), ..Rule::new(Direction::Ingress) },
            Rule { protocol: Protocol::Udp, port_min: Some(90), port_max: Some(80), ..Rule::new(Direction::Ingress) },
            Rule { protocol: Protocol::Icmp, port_min: Some(22), ..Rule::new(Direction::Ingress) },
            Rule { protocol: Protocol::Tcp, port_max: Some(22), ..Rule::new(Direction::Ingress) },
            Rule {
                remote_cidr: Some("10.0.0.0/8".parse().unwrap()),
                remote_group: Some("db".into()),
                ..Rule::new(Direction::Egress)
            },
            Rule { remote_group: Some("no-dash".into()), ..Rule::new(Direction::Egress) },
        ];
        let err = group.validate().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("rules[1].port_max: \"80\" is below port_min 90"), "{text}");
        assert_eq!(
            fields(err),
            [
                "name",
                "rules[0].port_min",
                "rules[1].port_max",
                "rules[2].port_min",
                "rules[3].port_max",
                "rules[4].remote_group",
                "rules[5].remote_group"
            ]
        );
        assert!(check_group_name(&"a".repeat(57)).is_ok());
        assert!(check_group_name(&"a".repeat(58)).is_err());
    }

    #[test]
    fn files_round_trip() {
        let rule = Rule { id: 7, protocol: Protocol::Tcp, port_min: Some(22), ..Rule::new(Direction::Ingress) };
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(json, r#"{"id":7,"direction":"ingress","protocol":"tcp","port_min":22}"#);
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
    }
}
