//! `quantix.node.v1.SecurityGroupService` over the node's security groups (`crate::security_groups`).

use std::sync::Arc;

use qx_common::{Problems, ValidationErrors};
use qx_net::ovn::{Direction, Ipv4Cidr, Protocol, Rule, SecurityGroup};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::security_group_service_server::SecurityGroupService;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::grpc::status;
use crate::node::Node;
use crate::security_groups::SecurityGroupError;

/// The gRPC face of security groups.
#[derive(Debug, Clone)]
pub struct SecurityGroupApi {
    node: Arc<Node>,
}

impl SecurityGroupApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

pub fn group_to_pb(group: &SecurityGroup) -> pb::SecurityGroup {
    pb::SecurityGroup {
        name: group.name.clone(),
        description: group.description.clone(),
        rules: group.rules.iter().map(rule_to_pb).collect(),
    }
}

fn rule_to_pb(rule: &Rule) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        id: rule.id,
        direction: rule.direction.as_str().to_owned(),
        protocol: rule.protocol.as_str().to_owned(),
        port_min: rule.port_min.map(u32::from),
        port_max: rule.port_max.map(u32::from),
        remote_cidr: rule.remote_cidr.map(|c| c.to_string()).unwrap_or_default(),
        remote_group: rule.remote_group.clone().unwrap_or_default(),
    }
}

/// Text that does not parse (direction, protocol, CIDR, ports above 65535) is refused here, every field at once,
/// under `prefix` (`rules[1].`, `rule.`).
fn rule_from_pb(rule: pb::SecurityGroupRule, prefix: &str, p: &mut Problems) -> Rule {
    let field = |f: &str| format!("{prefix}{f}");
    let direction = match rule.direction.as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        other => {
            p.add(field("direction"), other, "is not ingress or egress");
            Direction::Ingress
        }
    };
    let protocol = match rule.protocol.as_str() {
        "" | "any" => Protocol::Any,
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => {
            p.add(field("protocol"), other, "is not tcp, udp, icmp or any");
            Protocol::Any
        }
    };
    let mut port = |name: &str, value: Option<u32>| {
        value.map(|v| {
            u16::try_from(v).unwrap_or_else(|_| {
                p.add(field(name), v, "is not a port (1 to 65535)");
                1
            })
        })
    };
    let port_min = port("port_min", rule.port_min);
    let port_max = port("port_max", rule.port_max);
    let remote_cidr = (!rule.remote_cidr.is_empty())
        .then(|| match rule.remote_cidr.parse::<Ipv4Cidr>() {
            Ok(cidr) => Some(cidr),
            Err(problem) => {
                p.add(field("remote_cidr"), &rule.remote_cidr, problem);
                None
            }
        })
        .flatten();
    Rule {
        id: 0,
        direction,
        protocol,
        port_min,
        port_max,
        remote_cidr,
        remote_group: (!rule.remote_group.is_empty()).then_some(rule.remote_group),
    }
}

fn invalid(p: Problems) -> Result<(), Status> {
    p.into_result().map_err(|e: ValidationErrors| status(SecurityGroupError::Invalid(e)))
}

#[tonic::async_trait]
impl SecurityGroupService for SecurityGroupApi {
    async fn create_security_group(
        &self,
        request: Request<pb::SecurityGroup>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let request = request.into_inner();
        let mut p = Problems::default();
        let rules = request
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| rule_from_pb(r, &format!("rules[{i}]."), &mut p))
            .collect();
        invalid(p)?;
        let group = SecurityGroup { name: request.name, description: request.description, rules };
        let span = info_span!("CreateSecurityGroup", group = %group.name);
        let created = self.node.create_security_group(group).instrument(span).await.map_err(status)?;
        Ok(Response::new(group_to_pb(&created)))
    }

    async fn get_security_group(
        &self,
        request: Request<pb::SecurityGroupRef>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let name = request.into_inner().name;
        let group = self.node.security_groups().get(&name).ok_or(SecurityGroupError::NotFound(name)).map_err(status)?;
        Ok(Response::new(group_to_pb(&group)))
    }

    async fn list_security_groups(
        &self,
        _request: Request<pb::ListSecurityGroupsRequest>,
    ) -> Result<Response<pb::ListSecurityGroupsResponse>, Status> {
        let security_groups = self.node.security_groups().list().iter().map(group_to_pb).collect();
        Ok(Response::new(pb::ListSecurityGroupsResponse { security_groups }))
    }

    async fn delete_security_group(
        &self,
        request: Request<pb::SecurityGroupRef>,
    ) -> Result<Response<pb::DeleteSecurityGroupResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("DeleteSecurityGroup", group = %name);
        self.node.delete_security_group(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteSecurityGroupResponse {}))
    }

    async fn add_security_group_rule(
        &self,
        request: Request<pb::AddSecurityGroupRuleRequest>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let request = request.into_inner();
        let mut p = Problems::default();
        let rule = match request.rule {
            Some(rule) => rule_from_pb(rule, "rule.", &mut p),
            None => {
                p.add("rule", "", "is required");
                Rule::new(Direction::Ingress)
            }
        };
        invalid(p)?;
        let span = info_span!("AddSecurityGroupRule", group = %request.group, rule = %rule);
        let group = self.node.add_security_group_rule(&request.group, rule).instrument(span).await.map_err(status)?;
        Ok(Response::new(group_to_pb(&group)))
    }

    async fn delete_security_group_rule(
        &self,
        request: Request<pb::SecurityGroupRuleRef>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let request = request.into_inner();
        let span = info_span!("DeleteSecurityGroupRule", group = %request.group, rule = request.id);
        let group =
            self.node.delete_security_group_rule(&request.group, request.id).instrument(span).await.map_err(status)?;
        Ok(Response::new(group_to_pb(&group)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_that_do_not_parse_are_named_by_field() {
        let mut p = Problems::default();
        let bad = pb::SecurityGroupRule {
            direction: "inbound".into(),
            protocol: "sctp".into(),
            port_min: Some(70000),
            remote_cidr: "10.0.0.1/8".into(),
            ..Default::default()
        };
        rule_from_pb(bad, "rule.", &mut p);
        let fields: Vec<String> = p.0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["rule.direction", "rule.protocol", "rule.port_min", "rule.remote_cidr"]);

        let mut p = Problems::default();
        let good = pb::SecurityGroupRule {
            direction: "egress".into(),
            protocol: "udp".into(),
            port_min: Some(53),
            remote_group: "dns".into(),
            ..Default::default()
        };
        let rule = rule_from_pb(good, "rule.", &mut p);
        assert!(p.is_empty());
        assert_eq!(rule.to_string(), "egress udp 53 to group dns");
        let back = rule_to_pb(&rule);
        assert_eq!((back.protocol.as_str(), back.port_min, back.port_max), ("udp", Some(53), None));
    }
}
