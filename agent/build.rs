//! On Windows, embeds the Event Log message table (the events and their IDs are in
//! src/events.rs, shared with the agent) as the executable's message-table resource.
#![allow(dead_code)]

include!("src/events.rs");

// A build script that cannot write or compile the resource must stop the build: the expects below
// are that stop, with the reason.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/events.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("windows") {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("events.bin"), message_table()).expect("write events.bin");
    // Resource 1 of type 11 (RT_MESSAGETABLE) is where the Event Viewer and FormatMessage look.
    let rc = out.join("events.rc");
    std::fs::write(&rc, "1 11 \"events.bin\"\n").expect("write events.rc");
    winresource::WindowsResource::new()
        .set_resource_file(rc.to_str().expect("UTF-8 path"))
        .compile()
        .expect("compile the message-table resource");
}
