//! The policy: SDDL read into descriptors, who may change a file, and the plan for preparing
//! the service's folder. Plain code, unit-tested on every platform.

use std::path::{Path, PathBuf};

/// The service's folder (`%ProgramData%\Sallyport`): Administrators own it; SYSTEM and
/// Administrators have full control of it and of what is created in it; nothing is inherited from
/// ProgramData (where Users may read and create).
pub const DATA_DIR_SDDL: &str = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)";

/// A file already in the folder when it is taken in hand: the same two, and no one else.
pub const DATA_FILE_SDDL: &str = "O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)";

/// A private key, set before its first byte is written: SYSTEM, Administrators and the file's
/// owner (the user who enrolled: an elevated install makes that Administrators), no one else.
pub const KEY_SDDL: &str = "D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;OW)";

/// The `wsl` folder inside it, where the helper in each WSL2 distribution (running as the user who
/// installed) writes the distribution's address: the same, plus modify rights for that one user.
/// What it may write there is vetted when read (`targets/wsl.rs`).
pub fn wsl_dir_sddl(writer: &str) -> Result<String, AclError> {
    // A SID and nothing else: S-1-<authority>-<sub>..., digits and dashes only.
    let parts: Vec<&str> = writer.split('-').collect();
    let well_formed = parts.len() >= 3
        && parts[0] == "S"
        && parts[1] == "1"
        && parts[2..].iter().all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()));
    // A user's SID: a local or domain account (S-1-5-21-...) or an Entra ID one (S-1-12-1-...),
    // never a group or a well-known SID.
    let a_user = writer.starts_with("S-1-5-21-") && parts.len() >= 8 || writer.starts_with("S-1-12-1-");
    if !well_formed || !a_user {
        return Err(AclError::NotASid { text: writer.to_owned() });
    }
    // 0x1301bf: modify (read, write, execute, delete), not change access or owner.
    Ok(format!("O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1301bf;;;{writer})"))
}

/// SIDs trusted to write: LocalSystem, the Administrators group, and TrustedInstaller (which owns
/// Program Files).
const TRUSTED: [&str; 3] = ["SY", "BA", "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464"];

// Access bits (winnt.h). Generic rights, standard rights, then the file and folder specific ones.
const GENERIC_ALL: u32 = 0x1000_0000;
const GENERIC_WRITE: u32 = 0x4000_0000;
const DELETE: u32 = 0x0001_0000;
const WRITE_DAC: u32 = 0x0004_0000;
const WRITE_OWNER: u32 = 0x0008_0000;
/// FILE_WRITE_DATA on a file, FILE_ADD_FILE on a folder.
const WRITE_DATA: u32 = 0x0002;
/// FILE_APPEND_DATA on a file, FILE_ADD_SUBDIRECTORY on a folder.
const APPEND_DATA: u32 = 0x0004;
const WRITE_EA: u32 = 0x0010;
const DELETE_CHILD: u32 = 0x0040;
const WRITE_ATTRIBUTES: u32 = 0x0100;
const FILE_ALL: u32 = 0x001F_01FF;
const FILE_WRITE: u32 = 0x0012_0116;

/// What a path is, for which rights count as "can change it".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    /// A folder: adding or deleting entries changes it. Adding a *subfolder* does not, so C:\ (where
    /// Authenticated Users may create folders) does not count as writable by them.
    Folder,
}

impl Kind {
    fn write_mask(self) -> u32 {
        let common =
            GENERIC_ALL | GENERIC_WRITE | DELETE | WRITE_DAC | WRITE_OWNER | WRITE_DATA | DELETE_CHILD;
        match self {
            Kind::File => common | APPEND_DATA | WRITE_EA | WRITE_ATTRIBUTES,
            Kind::Folder => common,
        }
    }
}

/// A security descriptor as far as the checks need it: the owner and the DACL's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub owner: Option<String>,
    /// `None`: no DACL at all, which grants everyone everything.
    pub dacl: Option<Vec<Ace>>,
}

/// One access-control entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    pub allow: bool,
    /// Applies only to what is created inside (the `IO` flag), not to the object itself.
    pub inherit_only: bool,
    pub rights: u32,
    pub sid: String,
}

/// Why a path is not safe for the service, or why its descriptor could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("{path}: unreadable security descriptor {sddl:?}: {reason}")]
    Parse { path: PathBuf, sddl: String, reason: SddlError },
    #[error(
        "{path}: can be changed by {who} (only SYSTEM and Administrators may); {fix}",
        who = .writers.join(", ")
    )]
    Writable { path: PathBuf, writers: Vec<String>, fix: String },
    #[error(
        "{path} already exists and is owned by {owner}, not by SYSTEM or Administrators: someone created it \
         before the install. Check what is in it, then run again with --take-over (MSI: TAKEOVER=1)"
    )]
    ForeignOwner { path: PathBuf, owner: String },
    #[error("{path}: something was created in it while it was being set up ({entry}); check the folder and run again")]
    NotEmpty { path: PathBuf, entry: String },
    #[error("{}: a link (junction or symbolic link) to somewhere else: remove it (rmdir) and run again; the service's folders are never followed through links", path.display())]
    Link { path: PathBuf },
    #[error("--wsl-writer {text:?} is not a user's SID (S-1-5-21-... or S-1-12-1-...): a group (Everyone, Users, ...) would let every member write there")]
    NotASid { text: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What in SDDL text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SddlError {
    #[error("a part without ':'")]
    NoTag,
    #[error("unknown part {0:?}")]
    UnknownPart(String),
    #[error("entry ({entry}) has {fields} fields, not 6")]
    Fields { entry: String, fields: usize },
    #[error("rights {0:?}")]
    Rights(String),
}

impl Descriptor {
    /// Parses the owner and DACL parts of SDDL text (group and SACL are skipped).
    pub fn parse(sddl: &str) -> Result<Descriptor, SddlError> {
        let mut owner = None;
        let mut dacl = None;
        let mut rest = sddl.trim();
        while !rest.is_empty() {
            let (tag, body) = rest.split_at(rest.find(':').ok_or(SddlError::NoTag)?);
            let body = &body[1..];
            // A part runs to the next "X:" at the top level (outside parentheses).
            let end = next_part(body);
            let (part, next) = body.split_at(end);
            match tag {
                "O" => owner = Some(part.to_owned()),
                "D" => dacl = parse_acl(part)?,
                "G" | "S" => {}
                other => return Err(SddlError::UnknownPart(other.to_owned())),
            }
            rest = next;
        }
        Ok(Descriptor { owner, dacl })
    }

    /// The SIDs other than SYSTEM, Administrators and TrustedInstaller that can change the object:
    /// its owner (who may always rewrite the DACL), and every allow entry that applies to the object
    /// and grants a right that changes it. A missing DACL names "Everyone".
    pub fn writers(&self, kind: Kind) -> Vec<String> {
        let owner_trusted = self.owner_trusted();
        let mut writers = Vec::new();
        if let Some(owner) = &self.owner {
            if !owner_trusted {
                writers.push(format!("{} (owner)", describe(owner)));
            }
        }
        let Some(dacl) = &self.dacl else {
            writers.push("Everyone (no DACL)".to_owned());
            return writers;
        };
        for ace in dacl.iter().filter(|a| a.allow && !a.inherit_only) {
            if ace.rights & kind.write_mask() == 0 {
                continue;
            }
            // OWNER RIGHTS is whoever owns the object; CREATOR OWNER only appears on inherit-only
            // entries (skipped above).
            let sid = ace.sid.as_str();
            let ok = trusted(sid) || ((sid == "OW" || sid == "S-1-3-4") && owner_trusted);
            let who = describe(sid);
            if !ok && !writers.contains(&who) {
                writers.push(who);
            }
        }
        writers
    }

    /// True when the owner is SYSTEM, Administrators or TrustedInstaller.
    pub fn owner_trusted(&self) -> bool {
        self.owner.as_deref().is_some_and(trusted)
    }
}

/// SYSTEM, Administrators or TrustedInstaller, by alias or by number.
fn trusted(sid: &str) -> bool {
    TRUSTED.contains(&sid) || sid == "S-1-5-18" || sid == "S-1-5-32-544"
}

/// Where the part that starts `body` ends: at the next top-level `X:` tag.
fn next_part(body: &str) -> usize {
    let bytes = body.as_bytes();
    let mut depth = 0u32;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b':' if depth == 0 && i >= 1 && matches!(bytes[i - 1], b'O' | b'G' | b'D' | b'S') => {
                // "X:" starts the next part, unless the letter belongs to a SID ("S-1-...").
                return i - 1;
            }
            _ => {}
        }
    }
    body.len()
}

fn parse_acl(part: &str) -> Result<Option<Vec<Ace>>, SddlError> {
    let flags_end = part.find('(').unwrap_or(part.len());
    let flags = &part[..flags_end];
    if flags.contains("NO_ACCESS_CONTROL") {
        return Ok(None);
    }
    let mut aces = Vec::new();
    for entry in part[flags_end..].split(')').map(|s| s.trim_start_matches('(')).filter(|s| !s.is_empty()) {
        let fields: Vec<&str> = entry.split(';').collect();
        let [kind, ace_flags, rights, _, _, sid, ..] = fields[..] else {
            return Err(SddlError::Fields { entry: entry.to_owned(), fields: fields.len() });
        };
        let allow = match kind {
            "A" | "OA" | "XA" | "ZA" => true,
            "D" | "OD" | "XD" => false,
            // Audit, alarm and label entries grant nothing.
            _ => continue,
        };
        let inherit_only = ace_flags.as_bytes().chunks(2).any(|f| f == b"IO");
        aces.push(Ace { allow, inherit_only, rights: parse_rights(rights)?, sid: sid.to_owned() });
    }
    Ok(Some(aces))
}

/// Access rights as SDDL writes them: a number (`0x1200a9`) or two-letter codes (`FRFW`).
fn parse_rights(text: &str) -> Result<u32, SddlError> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).map_err(|_| SddlError::Rights(text.to_owned()));
    }
    if let Ok(n) = text.parse::<u32>() {
        return Ok(n);
    }
    let mut rights = 0;
    for code in text.as_bytes().chunks(2) {
        rights |= match code {
            b"GA" => GENERIC_ALL,
            b"GR" => 0x8000_0000,
            b"GW" => GENERIC_WRITE,
            b"GX" => 0x2000_0000,
            b"RC" => 0x0002_0000,
            b"SD" => DELETE,
            b"WD" => WRITE_DAC,
            b"WO" => WRITE_OWNER,
            b"FA" => FILE_ALL,
            b"FR" => 0x0012_0089,
            b"FW" => FILE_WRITE,
            b"FX" => 0x0012_00A0,
            // Directory-service letters, which SDDL reuses for the low bits.
            b"CC" => 0x1,
            b"DC" => WRITE_DATA,
            b"LC" => APPEND_DATA,
            b"SW" => 0x8,
            b"RP" => WRITE_EA,
            b"WP" => 0x20,
            b"DT" => DELETE_CHILD,
            b"LO" => 0x80,
            b"CR" => WRITE_ATTRIBUTES,
            // Registry and other object rights grant no file writes of their own; unknown letters
            // are refused rather than guessed.
            b"KA" => 0x000F_003F,
            b"KR" => 0x0002_0019,
            b"KW" => 0x0002_0006,
            b"KX" => 0x0002_0019,
            _ => return Err(SddlError::Rights(text.to_owned())),
        };
    }
    Ok(rights)
}

/// A SID in words where it is a well-known one.
fn describe(sid: &str) -> String {
    let name = match sid {
        "WD" | "S-1-1-0" => "Everyone",
        "AU" | "S-1-5-11" => "Authenticated Users",
        "BU" | "S-1-5-32-545" => "Users",
        "IU" | "S-1-5-4" => "Interactive users",
        "OW" | "S-1-3-4" => "the owner",
        "CO" | "S-1-3-0" => "CREATOR OWNER",
        _ => return sid.to_owned(),
    };
    format!("{name} ({sid})")
}

/// Checks that `sddl` (the descriptor of `path`) lets only SYSTEM and Administrators change it.
pub fn check_private(path: &Path, sddl: &str, kind: Kind, fix: &str) -> Result<(), AclError> {
    let descriptor = Descriptor::parse(sddl).map_err(|reason| AclError::Parse {
        path: path.to_owned(),
        sddl: sddl.to_owned(),
        reason,
    })?;
    let writers = descriptor.writers(kind);
    if writers.is_empty() {
        return Ok(());
    }
    Err(AclError::Writable { path: path.to_owned(), writers, fix: fix.to_owned() })
}

/// What the service checks at every start, and how to fix each: the folder, then each file in it
/// that decides what the service does or whom it trusts.
pub fn start_checks(data_dir: &Path) -> Vec<(PathBuf, Kind)> {
    let mut checks = vec![(data_dir.to_owned(), Kind::Folder)];
    for file in ["agent.toml", "ca.crt", "agent.crt", "agent.key"] {
        checks.push((data_dir.join(file), Kind::File));
    }
    checks
}

/// The fix a start-time refusal names.
pub fn start_fix(data_dir: &Path) -> String {
    format!(
        "run `sallyport-agent service prepare --dir \"{}\"` in an elevated prompt (it resets the folder to SYSTEM \
         and Administrators), check agent.toml, then start the service",
        data_dir.display()
    )
}

/// The paths whose descriptors decide whether a standard user can replace the service's program:
/// the program, then every folder above it.
pub fn binary_checks(exe: &Path) -> Vec<(PathBuf, Kind)> {
    let mut checks = vec![(exe.to_owned(), Kind::File)];
    checks.extend(
        exe.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).map(|p| (p.to_owned(), Kind::Folder)),
    );
    checks
}

/// The fix a refused program path names.
pub const BINARY_FIX: &str =
    "a LocalSystem service must run a program that only administrators can replace: \
    copy sallyport-agent.exe to \"C:\\Program Files\\Sallyport\\\" (install.ps1 and the MSI do) and run \
    `service install` from there";

/// Decides what `service prepare` does with a folder whose descriptor is `existing` (`None`: it
/// does not exist yet): create it, take it in hand, or refuse.
pub fn prepare_plan(path: &Path, existing: Option<&str>, take_over: bool) -> Result<Prepare, AclError> {
    let Some(sddl) = existing else {
        return Ok(Prepare::Create);
    };
    let descriptor = Descriptor::parse(sddl).map_err(|reason| AclError::Parse {
        path: path.to_owned(),
        sddl: sddl.to_owned(),
        reason,
    })?;
    if descriptor.owner_trusted() || take_over {
        return Ok(Prepare::Reset);
    }
    Err(AclError::ForeignOwner {
        path: path.to_owned(),
        owner: descriptor.owner.as_deref().map_or_else(|| "no one".to_owned(), describe),
    })
}

/// What `service prepare` does with the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// Create it, set [`DATA_DIR_SDDL`], and check that nothing slipped in meanwhile.
    Create,
    /// Set [`DATA_DIR_SDDL`] on it and [`DATA_FILE_SDDL`] (or the folder's, for folders) on
    /// everything in it.
    Reset,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ProgramData's own descriptor on Windows 10: Users may read, and create in subfolders.
    const PROGRAM_DATA: &str = "O:SYG:SYD:PAI(A;OICIIO;GA;;;CO)(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)(A;CI;0x100116;;;BU)";
    /// A folder a standard user made in ProgramData before the install.
    const USER_MADE: &str = "O:S-1-5-21-1-2-3-1001G:S-1-5-21-1-2-3-513D:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;FA;;;S-1-5-21-1-2-3-1001)";
    /// C:\ on Windows 10.
    const DRIVE: &str = "O:SYG:SYD:PAI(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;OICI;0x1200a9;;;BU)(A;OICIIO;SDGXGWGR;;;AU)(A;;LC;;;AU)";
    /// C:\Program Files.
    const PROGRAM_FILES: &str = "O:S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464G:S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464D:PAI(A;;FA;;;S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464)(A;CIIO;GA;;;S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464)(A;;0x1301bf;;;SY)(A;OICIIO;GA;;;SY)(A;;0x1301bf;;;BA)(A;OICIIO;GA;;;BA)(A;;0x1200a9;;;BU)(A;OICIIO;GXGR;;;BU)(A;OICIIO;GA;;;CO)";
    /// A user's Downloads folder.
    const DOWNLOADS: &str =
        "O:S-1-5-21-1-2-3-1001D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FA;;;S-1-5-21-1-2-3-1001)";

    #[test]
    fn the_planned_descriptors_pass_their_own_check() {
        for (sddl, kind) in [(DATA_DIR_SDDL, Kind::Folder), (DATA_FILE_SDDL, Kind::File)] {
            check_private(Path::new("x"), sddl, kind, "").expect("only SYSTEM and Administrators");
        }
        let key = Descriptor::parse(&format!("O:BA{KEY_SDDL}")).expect("parse");
        assert!(key.writers(Kind::File).is_empty(), "the owner is Administrators after an elevated enroll");
        let user_key = Descriptor::parse(&format!("O:S-1-5-21-9{KEY_SDDL}")).expect("parse");
        assert_eq!(user_key.writers(Kind::File).len(), 2, "a user's own key is theirs: {user_key:?}");
        assert!(DATA_DIR_SDDL.contains("D:P("), "protected: nothing inherited from ProgramData");
    }

    #[test]
    fn inherited_program_data_access_is_not_private() {
        // What the folder looked like before: ProgramData's entries inherited. Users may add files.
        let inherited = "O:BAD:AI(A;OICIIOID;GA;;;CO)(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;0x1200a9;;;BU)(A;CIID;0x100116;;;BU)";
        let err = check_private(Path::new(r"C:\ProgramData\Sallyport"), inherited, Kind::Folder, "fix it")
            .expect_err("Users may write");
        let text = err.to_string();
        assert!(text.contains("Users (BU)") && text.contains("fix it"), "{text}");
        check_private(Path::new("p"), PROGRAM_DATA, Kind::Folder, "").expect_err("ProgramData itself");
    }

    #[test]
    fn a_folder_a_user_made_first_is_refused_unless_taken_over() {
        let path = Path::new(r"C:\ProgramData\Sallyport");
        let err = prepare_plan(path, Some(USER_MADE), false).expect_err("owned by a user");
        assert!(matches!(err, AclError::ForeignOwner { .. }));
        assert!(
            err.to_string().contains("S-1-5-21-1-2-3-1001") && err.to_string().contains("--take-over"),
            "{err}"
        );
        assert_eq!(prepare_plan(path, Some(USER_MADE), true).expect("taken over"), Prepare::Reset);
        assert_eq!(prepare_plan(path, None, false).expect("new"), Prepare::Create);
        assert_eq!(prepare_plan(path, Some(DATA_DIR_SDDL), false).expect("ours"), Prepare::Reset);
        // The user's explicit entry is found by the start check too, owner or not.
        let writers = Descriptor::parse(USER_MADE).expect("parse").writers(Kind::Folder);
        assert_eq!(writers, ["S-1-5-21-1-2-3-1001 (owner)", "S-1-5-21-1-2-3-1001"]);
    }

    #[test]
    fn a_program_in_downloads_is_refused_and_program_files_is_not() {
        let exe = Path::new("C:\\").join("Program Files").join("Sallyport").join("sallyport-agent.exe");
        let checks = binary_checks(&exe);
        assert_eq!(checks[0], (exe.clone(), Kind::File));
        assert!(checks[1..].iter().all(|(_, k)| *k == Kind::Folder));
        assert_eq!(checks.len(), 4, "the program, its folder, Program Files, C:\\: {checks:?}");
        let installed = "O:BAD:AI(A;ID;FA;;;SY)(A;ID;FA;;;BA)(A;ID;0x1200a9;;;BU)(A;ID;FA;;;S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464)";
        check_private(&exe, installed, Kind::File, BINARY_FIX).expect("the installed program");
        check_private(Path::new(r"C:\Program Files"), PROGRAM_FILES, Kind::Folder, "")
            .expect("Program Files");
        check_private(Path::new("C:\\"), DRIVE, Kind::Folder, "")
            .expect("C:\\: creating folders is not writing");
        let err = check_private(Path::new(r"C:\Users\me\Downloads"), DOWNLOADS, Kind::Folder, BINARY_FIX)
            .expect_err("a user's folder");
        assert!(err.to_string().contains("Program Files"), "{err}");
    }

    #[test]
    fn rights_and_entries_that_change_an_object_are_found() {
        for (rights, kind, writes) in [
            ("FR", Kind::File, false),
            ("FX", Kind::File, false),
            ("0x1200a9", Kind::File, false),
            ("FW", Kind::File, true),
            ("GW", Kind::File, true),
            ("WD", Kind::File, true),
            ("WO", Kind::File, true),
            ("SD", Kind::File, true),
            ("0x4", Kind::File, true),
            ("LC", Kind::Folder, false),
            ("DC", Kind::Folder, true),
            ("DT", Kind::Folder, true),
            ("0x100116", Kind::Folder, true),
        ] {
            let sddl = format!("O:BAD:P(A;;{rights};;;BU)");
            let writers = Descriptor::parse(&sddl).expect("parse").writers(kind);
            assert_eq!(!writers.is_empty(), writes, "{rights} on a {kind:?}");
        }
        // A deny entry takes nothing away from the check; an inherit-only entry does not apply to
        // the object; no DACL is everyone.
        assert!(Descriptor::parse("O:BAD:(D;;FA;;;BU)").expect("parse").writers(Kind::File).is_empty());
        assert!(Descriptor::parse("O:BAD:(A;OICIIO;FA;;;BU)")
            .expect("parse")
            .writers(Kind::Folder)
            .is_empty());
        assert_eq!(
            Descriptor::parse("O:BAD:NO_ACCESS_CONTROL").expect("parse").writers(Kind::File),
            ["Everyone (no DACL)"]
        );
        assert!(Descriptor::parse("O:BAD:(A;;QQ;;;BU)").is_err(), "unknown rights are refused, not guessed");
        assert!(Descriptor::parse("O:BAD:(A;;FA;BU)").is_err());
    }

    #[test]
    fn the_wsl_folder_adds_one_user_by_sid_and_nothing_else() {
        let sddl = wsl_dir_sddl("S-1-5-21-1004336348-1177238915-682003330-1001").expect("a SID");
        let d = Descriptor::parse(&sddl).expect("parse");
        assert_eq!(d.writers(Kind::Folder), ["S-1-5-21-1004336348-1177238915-682003330-1001"]);
        let ace = d.dacl.as_ref().and_then(|a| a.last()).expect("the user's entry");
        assert_eq!(ace.rights & (WRITE_DAC | WRITE_OWNER), 0, "the user may not change who may write");
        assert!(
            wsl_dir_sddl("S-1-12-1-3735928559-1234567890-987654321-1122334455").is_ok(),
            "an Entra ID user"
        );
        let groups = ["S-1-1-0", "S-1-5-32-545", "S-1-5-11", "S-1-5-4", "S-1-5-18", "S-1-5-21-1-2-3"];
        for bad in ["", "BU", "WD", "S-1-5-21-1)(A;OICI;FA;;;WD", "S-1", "S-1-5-x", "Users"]
            .into_iter()
            .chain(groups)
        {
            assert!(matches!(wsl_dir_sddl(bad), Err(AclError::NotASid { .. })), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_service_checks_its_folder_and_the_files_that_decide_what_it_does() {
        let dir = Path::new(r"C:\ProgramData\Sallyport");
        let checks = start_checks(dir);
        assert_eq!(checks[0], (dir.to_owned(), Kind::Folder));
        let files: Vec<_> = checks[1..].iter().map(|(p, _)| p.file_name().map(|f| f.to_owned())).collect();
        assert_eq!(files.len(), 4);
        assert!(start_fix(dir).contains("service prepare"));
    }

    /// The Windows calls themselves. Under wine (CI) they run and must succeed, and what they read
    /// back must parse; wine keeps no file DACLs (it answers with a descriptor made from the Unix
    /// mode), so what is read back is compared with what was set on Windows only.
    #[cfg(windows)]
    #[test]
    fn descriptors_set_on_windows_read_back() {
        use std::io::Write;

        use crate::acl::{create_private_file, prepare, read};
        let wine = std::env::var_os("WINEPREFIX").is_some();
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("agent.key");
        let mut file = create_private_file(&key).expect("created with its descriptor");
        let sddl = read(&key).expect("read back");
        let descriptor = Descriptor::parse(&sddl).expect("parse");
        assert!(descriptor.owner.is_some(), "{sddl}");
        if !wine {
            let sids: Vec<&str> = descriptor.dacl.iter().flatten().map(|a| a.sid.as_str()).collect();
            assert_eq!(sids, ["SY", "BA", "OW"], "{sddl}");
        }
        file.write_all(b"key").expect("write");
        let data = dir.path().join("Sallyport");
        assert_eq!(prepare(&data, false).expect("prepared"), Prepare::Create);
        std::fs::write(data.join("agent.toml"), "x").expect("write");
        assert_eq!(prepare(&data, true).expect("again"), Prepare::Reset);
        for (path, kind) in [(data.clone(), Kind::Folder), (data.join("agent.toml"), Kind::File)] {
            let sddl = read(&path).expect("read back");
            Descriptor::parse(&sddl).expect("parse");
            if !wine {
                check_private(&path, &sddl, kind, "").expect("private");
            }
        }
    }
}
