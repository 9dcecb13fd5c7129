//! Any bytes as a tarball: extraction never panics and never writes
//! outside the release directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let tarball = dir.path().join("in.tar");
    std::fs::write(&tarball, data).expect("write");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let release = outside.join("release");
    let _ = dream_core::store::stage::extract_tar(&tarball, &release, 1 << 30);
    // Nothing but the release itself may appear next to it.
    for e in std::fs::read_dir(&outside).expect("read_dir").flatten() {
        assert_eq!(e.file_name(), "release", "extraction wrote {:?} outside", e.file_name());
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("read_dir").flatten().map(|e| e.file_name()).collect();
    assert!(names.len() == 2, "extraction wrote outside: {names:?}");
    let _ = dream_core::store::release::remove_tree(&release);
});
