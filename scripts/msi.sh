#!/usr/bin/env bash
# Builds the agent's Windows Installer package on Linux with msitools:
#   ./scripts/msi.sh EXE OUT.msi
# EXE is a built sallyport-agent.exe (./scripts/windows.sh build, or `windows.sh msi`, which builds
# and packages). wixl writes the package from deploy/windows/msi/sallyport-agent.wxs; the service
# settings wixl has no element for (delayed automatic start, restart on failure, failures without a
# crash count) are Windows Installer 5 tables, added from the .idt files beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 EXE OUT.msi" >&2; exit 2; }
exe=$(realpath "$1")
out=$2
[ -f "$exe" ] || { echo "msi.sh: $exe is missing" >&2; exit 1; }
for tool in wixl msibuild msiinfo; do
    command -v "$tool" >/dev/null || { echo "msi.sh: $tool is missing (apt-get install wixl msitools)" >&2; exit 1; }
done
version=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version/ { print $2; exit }' Cargo.toml)
src=deploy/windows/msi
# wixl takes file sources relative to where it runs: package from a scratch folder.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$exe" "$work/sallyport-agent.exe"
cp "$src/sallyport-agent.wxs" "$work/"
cp deploy/windows/sallyport-wsl-helper.sh "$work/"
(cd "$work" && wixl -a x64 -D Exe=sallyport-agent.exe -D Version="$version" -o package.msi sallyport-agent.wxs 2>wixl.log) || {
    cat "$work/wixl.log" >&2; exit 1; }
# wixl warns about attributes it does not model (Vital, KeyPath, Win64): only the rest is shown.
grep -v -e "has no property named" -e '^$' "$work/wixl.log" >&2 || true
mv "$work/package.msi" "$out"
msibuild "$out" -i "$src/MsiServiceConfig.idt" -i "$src/MsiServiceConfigFailureActions.idt"
if ! msiinfo export "$out" InstallExecuteSequence | grep -q '^MsiConfigureServices'; then
    # Applies the two tables above, right after InstallServices registers the service.
    msibuild "$out" -q "INSERT INTO \`InstallExecuteSequence\` (\`Action\`, \`Condition\`, \`Sequence\`) VALUES ('MsiConfigureServices', 'VersionNT >= 600', 5850)"
fi
# The properties a user passes on the command line reach the deferred custom actions only when
# secure; wixl lists its own (the upgrade's) there.
secure=$(msiinfo export "$out" Property | awk -F'\t' '$1 == "SecureCustomProperties" { print $2 }')
msibuild "$out" -q "UPDATE \`Property\` SET \`Value\` = '${secure:+$secure;}TOKENFILE;TAKEOVER;REMOVEDATA' WHERE \`Property\` = 'SecureCustomProperties'"
echo "built $out (sallyport-agent $version)"
