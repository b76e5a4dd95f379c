//! `qxctl sg`: security groups for VM NICs on OVN networks (SecurityGroupService).

use anyhow::bail;
use clap::{Args, Subcommand};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::security_group_service_client::SecurityGroupServiceClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum SgCommand {
    /// Every security group with its rules.
    List,
    /// A group with no rules yet: its NICs pass only DHCP until rules are added.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Refused while a VM's NIC or another group's rule names the group.
    Delete { name: String },
    /// Rules: added and deleted at once, also for running VMs.
    Rule {
        #[command(subcommand)]
        command: RuleCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Allow traffic: `qxctl sg rule add web ingress --protocol tcp --port 8080 --remote-cidr 10.0.0.0/8`.
    Add(RuleArgs),
    /// Delete a rule by its id (`qxctl sg list` shows them).
    Delete { group: String, id: u32 },
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    group: String,
    /// ingress (to the VM) or egress (from the VM).
    direction: String,
    /// tcp, udp, icmp or any.
    #[arg(long, default_value = "any")]
    protocol: String,
    /// tcp and udp: a destination port N or range N-M; every port when absent.
    #[arg(long)]
    port: Option<String>,
    /// The remote end as an IPv4 CIDR; anywhere when neither this nor --remote-group is given.
    #[arg(long, default_value = "")]
    remote_cidr: String,
    /// The remote end is the ports of this security group.
    #[arg(long, default_value = "")]
    remote_group: String,
}

/// `N` or `N-M`.
fn ports(text: &str) -> anyhow::Result<(Option<u32>, Option<u32>)> {
    let number = |t: &str| t.trim().parse::<u32>().ok();
    match text.split_once('-') {
        None => match number(text) {
            Some(port) => Ok((Some(port), None)),
            None => bail!("--port: {text:?} is not a port N or a range N-M"),
        },
        Some((min, max)) => match (number(min), number(max)) {
            (Some(min), Some(max)) => Ok((Some(min), Some(max))),
            _ => bail!("--port: {text:?} is not a port N or a range N-M"),
        },
    }
}

fn rule_text(rule: &pb::SecurityGroupRule) -> String {
    let ports = match (rule.port_min, rule.port_max) {
        (Some(min), Some(max)) if max != min => format!(" {min}-{max}"),
        (Some(min), _) => format!(" {min}"),
        (None, _) => String::new(),
    };
    let way = if rule.direction == "egress" { "to" } else { "from" };
    let remote = if !rule.remote_cidr.is_empty() {
        rule.remote_cidr.clone()
    } else if !rule.remote_group.is_empty() {
        format!("group {}", rule.remote_group)
    } else {
        "anywhere".to_owned()
    };
    format!("{} {}{ports} {way} {remote}", rule.direction, rule.protocol)
}

fn group_json(group: &pb::SecurityGroup) -> Value {
    let rules: Vec<Value> = group
        .rules
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "direction": r.direction, "protocol": r.protocol, "port_min": r.port_min,
                "port_max": r.port_max, "remote_cidr": r.remote_cidr, "remote_group": r.remote_group,
            })
        })
        .collect();
    json!({ "name": group.name, "description": group.description, "rules": rules })
}

fn print_groups(groups: &[pb::SecurityGroup], json: bool) {
    if json {
        println!("{}", Value::Array(groups.iter().map(group_json).collect()));
        return;
    }
    println!("{:<20} {:>4}  RULE", "GROUP", "ID");
    for group in groups {
        if group.rules.is_empty() {
            println!("{:<20} {:>4}  (none: only DHCP passes)", group.name, "-");
        }
        for rule in &group.rules {
            println!("{:<20} {:>4}  {}", group.name, rule.id, rule_text(rule));
        }
    }
}

pub async fn run(channel: Channel, command: SgCommand, json: bool) -> anyhow::Result<()> {
    let mut client = SecurityGroupServiceClient::new(channel);
    let group = match command {
        SgCommand::List => {
            let groups = client.list_security_groups(pb::ListSecurityGroupsRequest {}).await?.into_inner();
            print_groups(&groups.security_groups, json);
            return Ok(());
        }
        SgCommand::Create { name, description } => {
            let request = pb::SecurityGroup { name, description, rules: Vec::new() };
            client.create_security_group(request).await?.into_inner()
        }
        SgCommand::Delete { name } => {
            client.delete_security_group(pb::SecurityGroupRef { name: name.clone() }).await?;
            if json {
                println!("{}", json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
            return Ok(());
        }
        SgCommand::Rule { command: RuleCommand::Add(args) } => {
            let (port_min, port_max) = match &args.port {
                Some(text) => ports(text)?,
                None => (None, None),
            };
            let rule = pb::SecurityGroupRule {
                id: 0,
                direction: args.direction,
                protocol: args.protocol,
                port_min,
                port_max,
                remote_cidr: args.remote_cidr,
                remote_group: args.remote_group,
            };
            let request = pb::AddSecurityGroupRuleRequest { group: args.group, rule: Some(rule) };
            client.add_security_group_rule(request).await?.into_inner()
        }
        SgCommand::Rule { command: RuleCommand::Delete { group, id } } => {
            client.delete_security_group_rule(pb::SecurityGroupRuleRef { group, id }).await?.into_inner()
        }
    };
    print_groups(std::slice::from_ref(&group), json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_one_or_a_range() {
        assert_eq!(ports("22").unwrap(), (Some(22), None));
        assert_eq!(ports("1000-2000").unwrap(), (Some(1000), Some(2000)));
        assert!(ports("x").is_err());
        assert!(ports("1-").is_err());
    }
}
