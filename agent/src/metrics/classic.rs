//! prometheus-client writes OpenMetrics 1.0. Scrapers that ask for it (Prometheus does, in its `Accept`) get it
//! as written; everything else (`curl`, `promtool check metrics`, older collectors) gets the classic text format
//! 0.0.4, which differs in the three places this module rewrites:
//! - a counter family is named with its `_total` suffix (OpenMetrics names the family `x` and its sample
//!   `x_total`; the classic parser would take the sample for a second family without HELP or TYPE);
//! - there are no `# UNIT` lines and no `# EOF` terminator;
//! - `unknown` is `untyped`.

/// `openmetrics` (prometheus-client's output) in the classic text format.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes HELP before TYPE: the HELP line waits until the TYPE says whether to rename.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, kind) = match kind {
                "counter" if !family.ends_with("_total") => (format!("{family}_total"), kind),
                "unknown" => (family.to_owned(), "untyped"),
                _ => (family.to_owned(), kind),
            };
            let pending = help.take();
            let renamed = pending.filter(|(help_name, _)| *help_name == family).map(|_| name.as_str());
            flush_help(&mut out, pending, renamed);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            flush_help(&mut out, help.take(), None);
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help, None);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>, renamed: Option<&str>) {
    if let Some((name, text)) = help {
        out.push_str(&format!("# HELP {} {text}\n", renamed.unwrap_or(name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_total_suffix_and_openmetrics_only_lines_go() {
        let openmetrics = "# HELP qx_rpc_requests Calls.\n# TYPE qx_rpc_requests counter\n\
                           qx_rpc_requests_total{method=\"GetVm\"} 3\n\
                           # HELP qx_vm_disk_read_bytes Bytes read.\n# TYPE qx_vm_disk_read_bytes counter\n\
                           # UNIT qx_vm_disk_read_bytes bytes\nqx_vm_disk_read_bytes_total{vm=\"a\"} 512\n\
                           # HELP qx_vms VMs.\n# TYPE qx_vms gauge\nqx_vms{state=\"running\"} 1\n\
                           # HELP qx_x Other.\n# TYPE qx_x unknown\nqx_x 1\n# EOF\n";
        assert_eq!(
            to_classic(openmetrics),
            "# HELP qx_rpc_requests_total Calls.\n# TYPE qx_rpc_requests_total counter\n\
             qx_rpc_requests_total{method=\"GetVm\"} 3\n\
             # HELP qx_vm_disk_read_bytes_total Bytes read.\n# TYPE qx_vm_disk_read_bytes_total counter\n\
             qx_vm_disk_read_bytes_total{vm=\"a\"} 512\n\
             # HELP qx_vms VMs.\n# TYPE qx_vms gauge\nqx_vms{state=\"running\"} 1\n\
             # HELP qx_x Other.\n# TYPE qx_x untyped\nqx_x 1\n"
        );
    }
}
