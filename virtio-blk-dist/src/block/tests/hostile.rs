//! Malformed requests and corrupted queues.

use vm_memory::GuestAddress;

use super::*;

/// Checks the device is still healthy: a one-sector read works.
fn still_works(h: &mut Harness) {
    assert_eq!(h.simple(T_IN, 0, 512, true), (S_OK, 513));
}

#[test]
fn data_outside_guest_memory() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    let end = MEM_SIZE as u64;
    for (addr, len) in [
        (end - 256, 512),             // straddles the end of RAM
        (end, 512),                   // just past RAM
        (0xffff_ffff_ffff_fe00, 512), // wraps around
        (u64::MAX, 1024),
        (DATA, u32::MAX - 32), // far larger than guest memory
    ] {
        h.header(HDR, T_IN, 0);
        h.desc(0, HDR, 16, F_NEXT, 1);
        h.desc(1, addr, len, F_WRITE | F_NEXT, 2);
        h.desc(2, STATUS, 1, F_WRITE, 0);
        h.fill(STATUS, 1, UNTOUCHED);
        assert_eq!(h.run(0), 1, "{addr:#x}+{len:#x}");
        assert_eq!(h.byte(STATUS), S_IOERR);

        h.header(HDR, T_OUT, 0);
        h.desc(1, addr, len, F_NEXT, 2);
        assert_eq!(h.run(0), 1);
        assert_eq!(h.byte(STATUS), S_IOERR);
    }
    // A chain totalling more than 4 GiB is cut short by the chain iterator: no usable status.
    h.header(HDR, T_IN, 0);
    h.desc(1, DATA, u32::MAX, F_WRITE | F_NEXT, 2);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 0);
    assert_eq!(h.byte(STATUS), UNTOUCHED);
    // Header outside guest memory.
    h.desc(0, end - 8, 16, F_NEXT, 1);
    h.desc(1, STATUS, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    // Status byte outside guest memory: nothing to report to.
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, end, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 0);
    h.desc(1, u64::MAX, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 0);
    assert_eq!(h.image.contents(), data);
    still_works(&mut h);
}

#[test]
fn descriptor_loops() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.header(HDR, T_OUT, 0);
    h.fill(STATUS, 1, UNTOUCHED);
    // 0 -> 1 -> 2 -> 0 -> ...
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, F_NEXT, 2);
    h.desc(2, STATUS, 1, F_WRITE | F_NEXT, 0);
    assert_eq!(h.run(0), 0);
    // A descriptor pointing at itself.
    h.desc(3, STATUS, 1, F_WRITE | F_NEXT, 3);
    assert_eq!(h.run(3), 0);
    // A chain using every descriptor and then some: 0 -> 1 -> ... -> 15 -> 0.
    for i in 0..QSIZE {
        h.desc(i, STATUS, 1, F_WRITE | F_NEXT, (i + 1) % QSIZE);
    }
    assert_eq!(h.run(0), 0);
    assert_eq!(h.byte(STATUS), UNTOUCHED);
    assert_eq!(h.image.contents(), data);
    still_works(&mut h);
}

#[test]
fn chain_of_full_queue_length_is_fine() {
    let data = pattern(16);
    let mut h = Harness::new(&data, false);
    // Header, 14 data descriptors of one sector each, status: exactly QSIZE descriptors.
    h.header(HDR, T_IN, 1);
    h.desc(0, HDR, 16, F_NEXT, 1);
    for i in 1..QSIZE - 1 {
        h.desc(
            i,
            DATA + 512 * u64::from(i - 1),
            512,
            F_WRITE | F_NEXT,
            i + 1,
        );
    }
    h.desc(QSIZE - 1, STATUS, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 14 * 512 + 1);
    assert_eq!(h.byte(STATUS), S_OK);
    assert_eq!(h.read_mem(DATA, 14 * 512), &data[512..15 * 512]);
}

#[test]
fn next_index_out_of_range() {
    let mut h = Harness::new(&pattern(4), false);
    h.header(HDR, T_IN, 0);
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, QSIZE);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 0);
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, u16::MAX);
    assert_eq!(h.run(0), 0);
    still_works(&mut h);
}

#[test]
fn broken_indirect_tables() {
    let mut h = Harness::new(&pattern(4), false);
    let table = 0x6000;
    // An indirect table looping on itself.
    let mem = h.mem.clone();
    let entry = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let base = GuestAddress(table + 16 * i);
        mem.write_obj(addr, base).unwrap();
        mem.write_obj(len, GuestAddress(base.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(base.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(base.0 + 14)).unwrap();
    };
    entry(0, HDR, 16, F_NEXT, 1);
    entry(1, STATUS, 1, F_WRITE | F_NEXT, 0);
    h.desc(0, table, 32, F_INDIRECT, 0);
    assert_eq!(h.run(0), 0);
    // Table outside memory, misaligned length, nested indirection.
    h.desc(0, MEM_SIZE as u64, 32, F_INDIRECT, 0);
    assert_eq!(h.run(0), 0);
    h.desc(0, table, 17, F_INDIRECT, 0);
    assert_eq!(h.run(0), 0);
    entry(1, table, 32, F_INDIRECT, 0);
    h.desc(0, table, 32, F_INDIRECT, 0);
    assert_eq!(h.run(0), 0);
    still_works(&mut h);
}

#[test]
fn short_header() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.header(HDR, T_OUT, 0);
    h.desc(0, HDR, 8, F_NEXT, 1);
    h.desc(1, STATUS, 1, F_WRITE, 0);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    // Only a status byte.
    h.desc(0, STATUS, 1, F_WRITE, 0);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    assert_eq!(h.image.contents(), data);
}

#[test]
fn write_only_header() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.header(HDR, T_OUT, 0);
    h.desc(0, HDR, 16, F_WRITE | F_NEXT, 1);
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    h.desc(2, STATUS, 1, F_WRITE, 0);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    assert_eq!(h.image.contents(), data);
}

#[test]
fn wrong_direction_buffers() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    // IN with a device-readable data buffer: the guest buffer must stay untouched.
    h.fill(DATA, 512, 0x33);
    assert_eq!(h.simple(T_IN, 0, 512, false), (S_IOERR, 1));
    assert_eq!(h.read_mem(DATA, 512), vec![0x33; 512]);
    // OUT with a device-writable data buffer: the disk must stay untouched.
    assert_eq!(h.simple(T_OUT, 0, 512, true), (S_IOERR, 1));
    assert_eq!(h.read_mem(DATA, 512), vec![0x33; 512]);
    assert_eq!(h.image.contents(), data);
    // A readable buffer after a writable one.
    h.header(HDR, T_IN, 0);
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    h.desc(2, DATA + 512, 512, F_NEXT, 3);
    h.desc(3, STATUS, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    assert_eq!(h.read_mem(DATA, 512), vec![0x33; 512]);
}

#[test]
fn missing_or_empty_status() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.fill(DATA, 512, 0x44);
    h.header(HDR, T_OUT, 0);
    // Last descriptor is device-readable.
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, 0, 0);
    assert_eq!(h.run(0), 0);
    // Header only.
    h.desc(0, HDR, 16, 0, 0);
    assert_eq!(h.run(0), 0);
    // Zero-length status descriptor.
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, F_NEXT, 2);
    h.desc(2, STATUS, 0, F_WRITE, 0);
    h.fill(STATUS, 1, UNTOUCHED);
    assert_eq!(h.run(0), 0);
    assert_eq!(h.byte(STATUS), UNTOUCHED);
    assert_eq!(h.image.contents(), data);
    still_works(&mut h);
}

#[test]
fn sectors_past_the_end() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.fill(DATA, 1024, 0x55);
    // The last sector is fine.
    assert_eq!(h.simple(T_OUT, 3, 512, false), (S_OK, 1));
    let mut expected = data.clone();
    expected[3 * 512..].fill(0x55);
    for (sector, len) in [
        (4, 512),
        (3, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
        (1 << 55, 512),
    ] {
        assert_eq!(
            h.simple(T_OUT, sector, len, false),
            (S_IOERR, 1),
            "out {sector}"
        );
        assert_eq!(
            h.simple(T_IN, sector, len, true),
            (S_IOERR, 1),
            "in {sector}"
        );
    }
    // A zero-length transfer past the end is still out of range.
    assert_eq!(h.no_data(T_IN, 5), (S_IOERR, 1));
    assert_eq!(h.image.contents(), expected);
}

#[test]
fn unaligned_lengths() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.fill(DATA, 1024, 0x66);
    for len in [1, 100, 511, 513, 1023] {
        assert_eq!(h.simple(T_OUT, 0, len, false), (S_IOERR, 1), "out {len}");
        assert_eq!(h.simple(T_IN, 0, len, true), (S_IOERR, 1), "in {len}");
    }
    assert_eq!(h.read_mem(DATA, 1024), vec![0x66; 1024]);
    assert_eq!(h.image.contents(), data);
}

#[test]
fn huge_lengths_are_capped() {
    // 40 MiB of guest memory (mapped lazily), a 64 MiB sparse disk.
    let image = TempImage::new(&[]);
    std::fs::File::options()
        .write(true)
        .open(&image.path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let block = Block::new(&image.path, false).unwrap();
    let mut h = Harness::with_block(block, image, 40 << 20, false);
    let too_big = u32::try_from(crate::MAX_REQUEST_BYTES).unwrap() + 512;
    assert_eq!(h.simple(T_IN, 0, too_big, true), (S_IOERR, 1));
    assert_eq!(h.simple(T_OUT, 0, too_big, false), (S_IOERR, 1));
    // Split over several descriptors, each within the limit, still capped.
    h.header(HDR, T_IN, 0);
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, DATA, 20 << 20, F_WRITE | F_NEXT, 2);
    h.desc(2, DATA, 20 << 20, F_WRITE | F_NEXT, 3);
    h.desc(3, STATUS, 1, F_WRITE, 0);
    assert_eq!(h.run(0), 1);
    assert_eq!(h.byte(STATUS), S_IOERR);
    // Exactly the limit is accepted.
    let limit = u32::try_from(crate::MAX_REQUEST_BYTES).unwrap();
    assert_eq!(h.simple(T_IN, 0, limit, true), (S_OK, limit + 1));
}

#[test]
fn avail_index_beyond_ring_fails_device() {
    let mut h = Harness::new(&pattern(4), false);
    still_works(&mut h);
    let used_before = h.used_idx();
    h.set_avail_idx(1 + QSIZE + 1);
    assert!(matches!(h.notify(), Err(DeviceError::Failed(_))));
    assert_eq!(h.used_idx(), used_before);
    // The device stays down, without processing anything, until reset.
    assert!(matches!(h.notify(), Err(DeviceError::NotActivated)));
    h.block.reset();
    assert!(matches!(h.notify(), Err(DeviceError::NotActivated)));
}

#[test]
fn head_index_out_of_range_fails_device() {
    let mut h = Harness::new(&pattern(4), false);
    h.push(QSIZE + 3);
    assert!(matches!(h.notify(), Err(DeviceError::Failed(_))));
    assert!(matches!(h.notify(), Err(DeviceError::NotActivated)));
}

#[test]
fn completed_requests_are_signalled_before_failing() {
    let mut h = Harness::new(&pattern(4), false);
    h.header(HDR, T_FLUSH, 0);
    h.desc(0, HDR, 16, F_NEXT, 1);
    h.desc(1, STATUS, 1, F_WRITE, 0);
    h.push(0);
    h.push(QSIZE);
    assert!(h.notify().is_err());
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (0, 1));
    assert_eq!(h.line.count(), 1);
}
