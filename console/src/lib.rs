//! `qx-console`: the host console on TTY1 (ESXi's DCUI), a ratatui front end over the local qx-node socket. Not yet implemented.
