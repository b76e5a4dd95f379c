//! UEFI firmware for VMs: Debian's OVMF (package `ovmf`), a per-VM copy of its NVRAM variables kept with the VM,
//! and Secure Boot with Microsoft's keys enrolled (what Windows 11 and shim-signed Linux distributions boot with).
//!
//! The code image is shared and read-only; each VM writes only its own vars file, so boot entries and keys a guest
//! sets survive its restarts and move with the VM's directory.

use std::path::{Path, PathBuf};

use crate::host::HostRoot;

pub const OVMF_DIR: &str = "/usr/share/OVMF";
/// The per-VM NVRAM file, in the VM's directory.
pub const VARS_FILE: &str = "uefi-vars.fd";

/// The QEMU node names of the two flash devices.
const CODE_NODE: &str = "qx-uefi-code";
const VARS_NODE: &str = "qx-uefi-vars";

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("{path} is missing; install Debian's ovmf package")]
    Missing { path: PathBuf },
    #[error("secure_boot: needs the q35 machine type (System Management Mode), not {machine}")]
    SecureBootMachine { machine: String },
    #[error("NVRAM {path} holds {size} bytes, the firmware's template {expected}; reset the VM's NVRAM")]
    VarsSize { path: PathBuf, size: u64, expected: u64 },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the NVRAM copy {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: qx_storage::atomic::AtomicError,
    },
}

/// Whether QEMU machine type `machine` has System Management Mode, where Secure Boot's firmware guards its keys:
/// q35 does (`q35`, `pc-q35-X.Y`), i440fx does not.
pub fn has_smm(machine: &str) -> bool {
    machine.contains("q35")
}

/// The firmware files a VM boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    /// Copied into each VM's directory once; never written itself.
    pub vars_template: PathBuf,
    pub secure_boot: bool,
}

/// QEMU arguments for UEFI: properties for `-machine` and whole arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiArgs {
    /// `-machine` properties, e.g. `pflash0=qx-uefi-code`.
    pub machine: Vec<String>,
    pub args: Vec<String>,
}

impl Ovmf {
    /// The 4 MiB OVMF build under `root`: with Secure Boot, the SMM-enforcing code and the vars with Microsoft's
    /// keys enrolled (`OVMF_VARS_4M.ms.fd`); without, the plain code and empty vars.
    pub fn locate(root: &HostRoot, secure_boot: bool) -> Result<Self, FirmwareError> {
        let (code, vars) = if secure_boot {
            ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")
        } else {
            ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
        };
        let dir = root.path(OVMF_DIR);
        let (code, vars_template) = (dir.join(code), dir.join(vars));
        for path in [&code, &vars_template] {
            if !path.is_file() {
                return Err(FirmwareError::Missing { path: path.clone() });
            }
        }
        Ok(Self { code, vars_template, secure_boot })
    }

    /// Secure Boot's firmware guards its variables in System Management Mode, which only q35 has.
    pub fn check_machine(&self, machine: &str) -> Result<(), FirmwareError> {
        if self.secure_boot && !has_smm(machine) {
            return Err(FirmwareError::SecureBootMachine { machine: machine.to_owned() });
        }
        Ok(())
    }

    /// The VM's NVRAM copy in `vm_dir`, made from the template the first time (atomically, so a crash never leaves a
    /// torn one). An existing copy is kept: it holds what the guest stored. Returns its path and whether it is new.
    pub fn ensure_vars(&self, vm_dir: &Path) -> Result<(PathBuf, bool), FirmwareError> {
        let path = vm_dir.join(VARS_FILE);
        let expected = file_size(&self.vars_template)?;
        if path.exists() {
            let size = file_size(&path)?;
            if size != expected {
                return Err(FirmwareError::VarsSize { path, size, expected });
            }
            return Ok((path, false));
        }
        self.reset_vars(vm_dir).map(|path| (path, true))
    }

    /// Replaces the VM's NVRAM with a fresh copy of the template (forgets boot entries and enrolled keys).
    pub fn reset_vars(&self, vm_dir: &Path) -> Result<PathBuf, FirmwareError> {
        let path = vm_dir.join(VARS_FILE);
        let template = std::fs::read(&self.vars_template)
            .map_err(|source| FirmwareError::Read { path: self.vars_template.clone(), source })?;
        qx_storage::atomic::write_atomic(&path, &template)
            .map_err(|source| FirmwareError::Write { path: path.clone(), source })?;
        Ok(path)
    }

    /// The flash devices (code read-only, the VM's vars writable) and, for Secure Boot, SMM and the flash's
    /// secure mode, without which a guest could rewrite the keys.
    pub fn qemu_args(&self, vars: &Path) -> UefiArgs {
        let mut machine = vec![format!("pflash0={CODE_NODE}"), format!("pflash1={VARS_NODE}")];
        let mut args = vec![
            "-blockdev".to_owned(),
            format!("driver=file,node-name={CODE_NODE},filename={},read-only=on", opt_value(&self.code)),
            "-blockdev".to_owned(),
            format!("driver=file,node-name={VARS_NODE},filename={}", opt_value(vars)),
        ];
        if self.secure_boot {
            machine.push("smm=on".to_owned());
            args.extend(["-global".to_owned(), "driver=cfi.pflash01,property=secure,value=on".to_owned()]);
        }
        UefiArgs { machine, args }
    }
}

/// A path as a QEMU option value: commas doubled, since a single one would start the next option.
pub(crate) fn opt_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn file_size(path: &Path) -> Result<u64, FirmwareError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|source| FirmwareError::Read { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_ovmf() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("usr/share/OVMF");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, size) in [
            ("OVMF_CODE_4M.fd", 64),
            ("OVMF_CODE_4M.secboot.fd", 64),
            ("OVMF_VARS_4M.fd", 16),
            ("OVMF_VARS_4M.ms.fd", 16),
        ] {
            std::fs::write(dir.join(name), vec![name.len() as u8; size]).unwrap();
        }
        root
    }

    #[test]
    fn secure_boot_picks_the_enrolled_keys_and_smm() {
        let root = fake_ovmf();
        let ovmf = Ovmf::locate(&HostRoot::new(root.path()), true).unwrap();
        assert!(ovmf.code.ends_with("OVMF_CODE_4M.secboot.fd"));
        assert!(ovmf.vars_template.ends_with("OVMF_VARS_4M.ms.fd"));
        let args = ovmf.qemu_args(Path::new("/vms/a/uefi-vars.fd"));
        assert_eq!(args.machine, ["pflash0=qx-uefi-code", "pflash1=qx-uefi-vars", "smm=on"]);
        assert_eq!(
            args.args[1],
            format!("driver=file,node-name=qx-uefi-code,filename={},read-only=on", ovmf.code.display())
        );
        assert_eq!(args.args[3], "driver=file,node-name=qx-uefi-vars,filename=/vms/a/uefi-vars.fd");
        assert_eq!(args.args[4..], ["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        assert!(ovmf.check_machine("pc-q35-7.2").is_ok());
        let e = ovmf.check_machine("pc-i440fx-7.2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "secure_boot: needs the q35 machine type (System Management Mode), not pc-i440fx-7.2"
        );

        let plain = Ovmf::locate(&HostRoot::new(root.path()), false).unwrap();
        assert!(plain.vars_template.ends_with("OVMF_VARS_4M.fd"));
        assert_eq!(plain.qemu_args(Path::new("/v")).args.len(), 4, "no SMM, no secure flash");
        assert!(plain.check_machine("pc-i440fx-7.2").is_ok());
    }

    #[test]
    fn the_nvram_copy_is_made_once_and_kept() {
        let root = fake_ovmf();
        let ovmf = Ovmf::locate(&HostRoot::new(root.path()), true).unwrap();
        let vm = tempfile::tempdir().unwrap();
        let (path, created) = ovmf.ensure_vars(vm.path()).unwrap();
        assert!(created);
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&ovmf.vars_template).unwrap());
        // What the guest stores stays.
        std::fs::write(&path, vec![7u8; 16]).unwrap();
        assert_eq!(ovmf.ensure_vars(vm.path()).unwrap(), (path.clone(), false));
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 16]);
        std::fs::write(&path, vec![7u8; 8]).unwrap();
        let e = ovmf.ensure_vars(vm.path()).unwrap_err();
        assert!(e.to_string().contains("holds 8 bytes, the firmware's template 16"), "{e}");
        ovmf.reset_vars(vm.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&ovmf.vars_template).unwrap());
    }

    #[test]
    fn missing_firmware_names_the_file_and_the_package() {
        let root = tempfile::tempdir().unwrap();
        let e = Ovmf::locate(&HostRoot::new(root.path()), false).unwrap_err();
        assert!(e.to_string().ends_with("OVMF_CODE_4M.fd is missing; install Debian's ovmf package"), "{e}");
    }
}
