//! Writing to the Windows Event Log under the agent's own event IDs ([`super::events`]), and
//! registering the source. No maintained crate writes events under chosen IDs (the log backends
//! write every event of a level under one ID), so the three Win32 calls are made here directly;
//! this module is the agent's only `unsafe` code.
#![allow(unsafe_code)]

use windows_sys::Win32::{
    Foundation::HANDLE,
    System::EventLog::{
        DeregisterEventSource, RegisterEventSourceW, ReportEventW, EVENTLOG_ERROR_TYPE,
        EVENTLOG_INFORMATION_TYPE, EVENTLOG_WARNING_TYPE,
    },
};

use crate::events::{message_id, Severity};

const SOURCES: &str = r"SYSTEM\CurrentControlSet\Services\EventLog\Application";

/// Registers `source` under the Application log with `exe` as its message file (its message table
/// holds the events' texts): what the MSI's Registry table writes too.
pub fn register(source: &str, exe: &std::path::Path) -> std::io::Result<()> {
    let machine = winreg::RegKey::predef(winreg::enums::HKEY_LOCAL_MACHINE);
    let (key, _) = machine.open_subkey(SOURCES)?.create_subkey(source)?;
    key.set_value("EventMessageFile", &exe.as_os_str())?;
    key.set_value("TypesSupported", &7u32)?;
    Ok(())
}

pub fn deregister(source: &str) -> std::io::Result<()> {
    winreg::RegKey::predef(winreg::enums::HKEY_LOCAL_MACHINE).open_subkey(SOURCES)?.delete_subkey(source)
}

/// An open event source.
#[derive(Debug)]
pub struct EventLog {
    handle: HANDLE,
}

// SAFETY: an event source handle may be used from any thread (ReportEvent is thread-safe).
unsafe impl Send for EventLog {}
unsafe impl Sync for EventLog {}

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().filter(|&u| u != 0).chain(std::iter::once(0)).collect()
}

impl EventLog {
    pub fn open(source: &str) -> std::io::Result<EventLog> {
        let name = wide(source);
        // SAFETY: `name` is a NUL-terminated UTF-16 string that outlives the call; a null server
        // name means this machine.
        let handle = unsafe { RegisterEventSourceW(std::ptr::null(), name.as_ptr()) };
        if handle.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventLog { handle })
    }

    /// Writes one event: `id` with `severity`, `text` as its one insertion string.
    pub fn report(&self, id: u16, severity: Severity, text: &str) -> std::io::Result<()> {
        let kind = match severity {
            Severity::Information => EVENTLOG_INFORMATION_TYPE,
            Severity::Warning => EVENTLOG_WARNING_TYPE,
            Severity::Error => EVENTLOG_ERROR_TYPE,
        };
        // An event's text is limited to 31,839 characters.
        let text: String = text.chars().take(31_000).collect();
        let text = wide(&text);
        let strings = [text.as_ptr()];
        // SAFETY: the handle is open (closed only in Drop); `strings` holds one pointer to a
        // NUL-terminated UTF-16 string, both alive for the call; no SID and no raw data.
        let ok = unsafe {
            ReportEventW(
                self.handle,
                kind,
                0,
                message_id(id, severity),
                std::ptr::null_mut(),
                1,
                0,
                strings.as_ptr(),
                std::ptr::null(),
            )
        };
        if ok == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // SAFETY: the handle came from RegisterEventSourceW and is closed once.
        unsafe { DeregisterEventSource(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use windows_sys::Win32::System::Diagnostics::Debug::{
        FormatMessageW, FORMAT_MESSAGE_ARGUMENT_ARRAY, FORMAT_MESSAGE_FROM_HMODULE,
    };

    use super::*;
    use crate::events::EVENTS;

    /// The message table the build embeds: every event's ID formats to its insertion string, read
    /// from this executable's own resources, as the Event Viewer reads them from the agent's.
    #[test]
    fn every_event_id_has_its_message_in_the_executable() {
        for (id, severity, what) in EVENTS {
            let arg = wide(what);
            let args = [arg.as_ptr() as usize];
            let mut buffer = [0u16; 256];
            // SAFETY: a null source with FROM_HMODULE means this process's executable; the
            // argument array holds one pointer to a NUL-terminated string; the buffer's length is
            // passed.
            let n = unsafe {
                FormatMessageW(
                    FORMAT_MESSAGE_FROM_HMODULE | FORMAT_MESSAGE_ARGUMENT_ARRAY,
                    std::ptr::null(),
                    message_id(id, severity),
                    0,
                    buffer.as_mut_ptr(),
                    buffer.len() as u32,
                    args.as_ptr() as *const *const i8,
                )
            };
            assert!(n > 0, "event {id}: no message: {}", std::io::Error::last_os_error());
            let text = String::from_utf16_lossy(&buffer[..n as usize]);
            assert_eq!(text.trim_end(), what, "event {id}");
        }
    }

    #[test]
    fn an_event_is_reported() {
        let log = EventLog::open("Sallyport Agent test").expect("open a source");
        log.report(1000, Severity::Information, "tunnel up (test)").expect("reported");
    }
}
