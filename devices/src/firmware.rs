//! OVMF
