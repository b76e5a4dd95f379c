//! The firmware a VM boots: SeaBIOS (QEMU's default, nothing to prepare) or UEFI from OVMF, whose per-VM NVRAM copy
//! is made at the VM's first start and kept in its directory (`qx_devices::firmware` does the file work).

use qx_devices::firmware::{FirmwareError, Ovmf, UefiArgs};

use crate::host::HostRoot;
use crate::persist::VmDir;
use crate::spec::{Firmware, VmSpec};

/// The flash devices `spec` boots with, its NVRAM copied from the firmware's template when the VM has none yet;
/// `None` for SeaBIOS. Blocking (file copies).
pub fn uefi_args(host: &HostRoot, dir: &VmDir, spec: &VmSpec) -> Result<Option<UefiArgs>, FirmwareError> {
    if spec.firmware != Firmware::Uefi {
        return Ok(None);
    }
    let ovmf = Ovmf::locate(host, spec.secure_boot)?;
    ovmf.check_machine(&spec.machine)?;
    let (vars, _created) = ovmf.ensure_vars(dir.path())?;
    Ok(Some(ovmf.qemu_args(&vars)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seabios_needs_nothing_and_a_host_without_ovmf_is_named() {
        let root = tempfile::tempdir().unwrap();
        let (host, dir) = (HostRoot::new(root.path()), VmDir::new(root.path(), "vm"));
        let mut spec = VmSpec::from_text("name: vm\nkernel: {kernel: /k}\n").unwrap();
        assert!(uefi_args(&host, &dir, &spec).unwrap().is_none());
        spec.firmware = Firmware::Uefi;
        let error = uefi_args(&host, &dir, &spec).unwrap_err();
        assert!(error.to_string().contains("OVMF_CODE_4M.fd is missing; install Debian's ovmf package"), "{error}");
    }

    #[test]
    fn the_nvram_copy_is_made_once_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let ovmf = root.path().join("usr/share/OVMF");
        std::fs::create_dir_all(&ovmf).unwrap();
        std::fs::write(ovmf.join("OVMF_CODE_4M.fd"), vec![0u8; 4096]).unwrap();
        std::fs::write(ovmf.join("OVMF_VARS_4M.fd"), vec![1u8; 4096]).unwrap();
        let (host, dir) = (HostRoot::new(root.path()), VmDir::new(root.path(), "vm"));
        std::fs::create_dir_all(dir.path()).unwrap();
        let mut spec = VmSpec::from_text("name: vm\nfirmware: uefi\nkernel: {kernel: /k}\n").unwrap();
        let args = uefi_args(&host, &dir, &spec).unwrap().unwrap();
        assert_eq!(args.machine, ["pflash0=qx-uefi-code", "pflash1=qx-uefi-vars"]);
        let vars = dir.path().join(qx_devices::firmware::VARS_FILE);
        std::fs::write(&vars, vec![2u8; 4096]).unwrap();
        uefi_args(&host, &dir, &spec).unwrap();
        assert_eq!(std::fs::read(&vars).unwrap(), vec![2u8; 4096], "what the guest wrote is kept");
        spec.secure_boot = true;
        let error = uefi_args(&host, &dir, &spec).unwrap_err();
        assert!(error.to_string().contains("OVMF_CODE_4M.secboot.fd is missing"), "{error}");
    }
}
