//! swtpm
