//! Entry points for the fuzz targets (`fuzz/`): the parsers that take bytes a standard user or
//! another program writes, reached from outside the crate. Each checks the properties its target
//! asserts and panics when one breaks.

use std::net::{IpAddr, Ipv4Addr};

use crate::targets::wsl::{parse_addresses, vet_vm_address, Switch};

/// A WSL helper file (or `wsl.exe` output), written by a standard user: read as an address or
/// not; an address let through lies inside the virtual switch's subnet and is neither the host's
/// own address there, nor loopback, nor the subnet's broadcast.
pub fn wsl_helper_file(bytes: &[u8]) {
    let Some(addr) = parse_addresses(bytes) else { return };
    let host = Ipv4Addr::new(172, 29, 0, 1);
    let switch = Switch { host: IpAddr::V4(host), prefix: 20 };
    if vet_vm_address(addr, &[switch]).is_ok() {
        let IpAddr::V4(v4) = addr else { panic!("an IPv6 address let through an IPv4 switch: {addr}") };
        let (a, h) = (u32::from(v4), u32::from(host));
        assert_eq!(a >> 12, h >> 12, "{addr} is outside 172.29.0.0/20");
        assert!(a != h && a & 0xfff != 0xfff && !v4.is_loopback(), "{addr} let through");
    }
}
