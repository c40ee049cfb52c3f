//! The fuzz target's property (fuzz/check.rs) on the stable toolchain, over a fixed
//! set of seeded random inputs and hand-picked nasty ones, so every test run checks it.
//! `scripts/fuzz.sh` runs the real coverage-guided fuzzer (nightly) for longer.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[path = "../fuzz/check.rs"]
mod check;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn rewrite_and_key_validation_hold_on_hostile_input() {
    let nasty: &[&[u8]] = &[
        b"image/\xffavatar/\xff\xff\xffimage/a.png",
        b"image\xffavatar\xff(.*)\xff../$1\xffimage/x",
        b"image/\xffavatar/\xff^(.*)$\xff\xffimage/x",
        b"image/\xffavatar/\xff(a)\xff$1$1$1$1$1$1$1$1$1$1$1$1$1$1$1$1$1$1\xffimage/aaaa",
        b"\xff\xff\xff\xff/leading/slash",
        b"image/\xffavatar/\xff\xff\xffimage/nul\0byte",
        b"image/\xffavatar/\xff\xff\xffimage/./x",
        b"image/\xffavatar/\xff.\xff..\xffimage/x",
        b"image/\xffavatar/\xff(?P<n>.)\xff${n}/..\xffimage/a",
        b"\xc3\x28\xff\xa0\xa1\xff\xe2\x28\xa1\xff\xf0\x28\x8c\xbc\xffimage/\xc3\x28",
    ];
    for n in nasty {
        check::check(n);
    }
    let long = [
        b"image/\xffavatar/\xff\xff\xffimage/".as_slice(),
        &[b'k'; 1100],
    ]
    .concat();
    check::check(&long);

    let mut rng = StdRng::seed_from_u64(0xf022);
    let alphabet: &[u8] = b"image/avatr.$1(){}*?+\\-_ \x00\x7f\xff\xc3\xa9/..";
    for _ in 0..100_000 {
        let len = rng.random_range(0..48);
        let data: Vec<u8> = (0..len)
            .map(|_| {
                if rng.random_bool(0.8) {
                    alphabet[rng.random_range(0..alphabet.len())]
                } else {
                    rng.random()
                }
            })
            .collect();
        check::check(&data);
    }
}
