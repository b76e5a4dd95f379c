//! The machine shape a VM is pinned to at creation: a versioned machine type and an explicit CPU model, read from
//! what the installed QEMU reports, so that a QEMU upgrade (or a migration target) gives the guest the same
//! machine. `q35` and `pc` are aliases QEMU moves to its newest version on every release; `pc-q35-7.2` stays.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tracing::warn;

/// CPU models a new VM gets when its spec names none, best first: the first this QEMU knows is taken.
/// `x86-64-v2-AES` is Proxmox's default (runs on every x86-64 host of the last decade, under KVM and TCG);
/// `qemu64` is what QEMU itself defaults to.
pub const DEFAULT_CPU_MODELS: [&str; 3] = ["x86-64-v2-AES", "x86-64-v2", "qemu64"];
/// The CPU model `cpu: host` stands for: the host CPU passed through (KVM only; such a VM can only move to an
/// identical host).
pub const HOST_CPU: &str = "host";

/// What the installed QEMU offers, as `-machine help` and `-cpu help` list it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuCaps {
    /// Machine aliases (`q35`) and the versioned type each stands for (`pc-q35-7.2`).
    pub aliases: BTreeMap<String, String>,
    /// Every machine type, aliases included.
    pub machines: Vec<String>,
    /// Every CPU model name.
    pub cpu_models: Vec<String>,
}

impl QemuCaps {
    /// Asks `binary`; a QEMU that cannot be run leaves everything empty (specs are then pinned to what they say,
    /// and start reports the real problem).
    pub fn probe(binary: &Path) -> Self {
        let run = |args: &[&str]| -> String {
            match Command::new(binary).args(args).output() {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
                Ok(out) => {
                    warn!(binary = %binary.display(), ?args, status = %out.status, "QEMU did not list its capabilities");
                    String::new()
                }
                Err(e) => {
                    warn!(binary = %binary.display(), ?args, error = %e, "cannot run QEMU to list its capabilities");
                    String::new()
                }
            }
        };
        Self::parse(&run(&["-machine", "help"]), &run(&["-cpu", "help"]))
    }

    /// Parses `-machine help` and `-cpu help` output.
    pub fn parse(machine_help: &str, cpu_help: &str) -> Self {
        let mut caps = QemuCaps::default();
        for line in machine_help.lines().skip_while(|l| !l.starts_with("Supported machines")).skip(1) {
            let Some(name) = line.split_whitespace().next() else { continue };
            caps.machines.push(name.to_owned());
            if let Some(target) = line.split("(alias of ").nth(1).and_then(|rest| rest.split(')').next()) {
                caps.aliases.insert(name.to_owned(), target.to_owned());
            }
        }
        for line in cpu_help.lines() {
            // `x86 Skylake-Client  Intel Core Processor (Skylake)`; the list ends at a blank line.
            let mut words = line.split_whitespace();
            if words.next() != Some("x86") {
                if line.trim().is_empty() && !caps.cpu_models.is_empty() {
                    break;
                }
                continue;
            }
            if let Some(name) = words.next() {
                caps.cpu_models.push(name.to_owned());
            }
        }
        caps
    }

    /// The versioned machine type `machine` stands for (itself when it is versioned or unknown).
    pub fn pin_machine(&self, machine: &str) -> String {
        self.aliases.get(machine).cloned().unwrap_or_else(|| machine.to_owned())
    }

    /// The CPU model a new VM gets when its spec names none.
    pub fn default_cpu(&self) -> &'static str {
        DEFAULT_CPU_MODELS.into_iter().find(|m| self.cpu_models.iter().any(|c| c == m)).unwrap_or("qemu64")
    }

    /// Whether this QEMU has machine type `machine` (true when the list could not be read).
    pub fn has_machine(&self, machine: &str) -> bool {
        self.machines.is_empty() || self.machines.iter().any(|m| m == machine)
    }

    /// Whether this QEMU has CPU model `cpu` (true when the list could not be read).
    pub fn has_cpu(&self, cpu: &str) -> bool {
        cpu == HOST_CPU || self.cpu_models.is_empty() || self.cpu_models.iter().any(|m| m == cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINES: &str = "Supported machines are:\n\
        microvm              microvm (i386)\n\
        pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n\
        pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n\
        pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)\n\
        q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n\
        pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n\
        none                 empty machine\n";
    const CPUS: &str = "Available CPUs:\n\
        x86 486                   (alias configured by machine type)\n\
        x86 qemu64                QEMU Virtual CPU version 2.5+\n\
        x86 x86-64-v2-AES         (alias configured by machine type)\n\
        x86 host                  KVM processor with all supported host features\n\
        \n\
        Recognized CPUID flags:\n\
        x86 fpu\n";

    #[test]
    fn aliases_pin_to_the_versioned_type() {
        let caps = QemuCaps::parse(MACHINES, CPUS);
        assert_eq!(caps.pin_machine("q35"), "pc-q35-7.2");
        assert_eq!(caps.pin_machine("pc"), "pc-i440fx-7.2");
        assert_eq!(caps.pin_machine("pc-q35-7.2"), "pc-q35-7.2");
        assert!(caps.has_machine("pc-i440fx-7.1") && !caps.has_machine("pc-q35-9.9"));
    }

    #[test]
    fn the_default_cpu_is_the_best_model_this_qemu_has() {
        let caps = QemuCaps::parse(MACHINES, CPUS);
        assert_eq!(caps.cpu_models, ["486", "qemu64", "x86-64-v2-AES", "host"], "CPUID flags are not models");
        assert_eq!(caps.default_cpu(), "x86-64-v2-AES");
        let old = QemuCaps::parse(MACHINES, "Available CPUs:\nx86 qemu64  QEMU\n");
        assert_eq!(old.default_cpu(), "qemu64");
        assert!(old.has_cpu("host") && !old.has_cpu("Skylake-Client"));
    }

    #[test]
    fn an_unreadable_qemu_pins_nothing_and_refuses_nothing() {
        let caps = QemuCaps::parse("", "");
        assert_eq!(caps.pin_machine("q35"), "q35");
        assert!(caps.has_machine("anything") && caps.has_cpu("anything"));
    }
}
