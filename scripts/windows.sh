#!/usr/bin/env bash
# Builds Sallyport for Windows (x86_64-pc-windows-gnu) on Debian/Ubuntu and runs its unit tests
# under wine. Uses Debian's rustc-web with its matching standard library sources and the mingw-w64
# toolchain, building std for the target (-Zbuild-std), in its own target directory.
#
#   ./scripts/windows.sh build            # sallyport-agent.exe -> target/windows/x86_64-pc-windows-gnu/release/
#   ./scripts/windows.sh check            # type-check the Windows-facing crates
#   ./scripts/windows.sh test             # unit tests of proto, runtime and agent, run under wine
#   ./scripts/windows.sh e2e              # sallyport-agent.exe under wine against the Linux relay
#   ./scripts/windows.sh msi [--release]  # the MSI (scripts/msi.sh) -> target/windows/sallyport-agent.msi
#   ./scripts/windows.sh prefix           # prepare the wine prefix with its stand-ins; print its path
#
# Installs what it needs with apt-get the first time (root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-pc-windows-gnu
crates=(-p sallyport-proto -p sallyport-runtime -p sallyport-agent)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

install() {
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! [ -x /usr/bin/rustc ] || ! [ -d /usr/lib/rustlib/src/rust/library ] \
    || ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
    # rustc-web is Debian's newer rustc; rust-web-src is its standard library source, which
    # -Zbuild-std compiles for the target; the mingw package brings gcc, binutils and dlltool.
    install rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64-win32
fi
version=$(/usr/bin/rustc -V | awk '{print $2}')
if ! [ -f "/usr/src/rustc-$version/library/Cargo.lock" ]; then
    echo "windows.sh: rust-web-src does not match rustc $version; install matching versions" >&2
    exit 1
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${SALLYPORT_WINDOWS_TARGET_DIR:-target/windows}
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
cargo=(/usr/bin/cargo)
build_std=(-Zbuild-std=std,panic_abort --target "$target")

prepare_wine() {
    command -v /usr/lib/wine/wine64 >/dev/null || install wine64
    export WINEPREFIX=${WINEPREFIX:-$PWD/target/windows/wineprefix} WINEDEBUG=-all
    export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=/usr/lib/wine/wine64
    # What wine 8 lacks and Windows 10 has, as a stand-in DLL in the test prefix only (see
    # scripts/wine/standins.c): ProcessPrng, and the ECN socket options quinn-udp sets.
    local dll="$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
    local stamp="$WINEPREFIX/standins.sha256"
    local want
    want=$(sha256sum scripts/wine/standins.c | cut -d' ' -f1)
    if ! [ -f "$dll" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        if ! [ -d "$WINEPREFIX/drive_c/windows/system32" ]; then
            mkdir -p "$WINEPREFIX"
            /usr/lib/wine/wine64 wineboot -i >/dev/null 2>&1 || true
        fi
        x86_64-w64-mingw32-gcc -shared -O2 -o "$dll" scripts/wine/standins.c -ladvapi32 -lws2_32
        echo "$want" >"$stamp"
    fi
}

command=${1:-build}
shift || true
case "$command" in
    build)
        "${cargo[@]}" build --release "${build_std[@]}" -p sallyport-agent "$@"
        echo "built $CARGO_TARGET_DIR/$target/release/sallyport-agent.exe"
        ;;
    check)
        "${cargo[@]}" check "${build_std[@]}" "${crates[@]}" --all-targets "$@"
        ;;
    test)
        prepare_wine
        log=$(mktemp)
        # Dependencies unoptimized: this build is for running the unit tests once, so compile time
        # is what counts.
        "${cargo[@]}" test "${build_std[@]}" "${crates[@]}" --lib --bins \
            --config 'profile.dev.package."*".opt-level=0' "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        passed=$(awk '/^test result:/ { n += $4 } END { print n + 0 }' "$log")
        rm -f "$log"
        echo "windows: $passed unit tests passed under wine"
        exit "$status"
        ;;
    e2e)
        # sallyport-agent.exe under wine against the Linux relay (tests/tests/wine.rs). The .exe is
        # built with the unit tests' crates, targets and settings (dependencies unoptimized), so the
        # dependencies `test` built are reused: its throughput is an indication, not a figure.
        prepare_wine
        "${cargo[@]}" build "${build_std[@]}" "${crates[@]}" --lib --bins --tests \
            --config 'profile.dev.package."*".opt-level=0' "$@"
        exe="$PWD/$CARGO_TARGET_DIR/$target/debug/sallyport-agent.exe"
        # The Linux side (the relay and the test) with the usual toolchain and target directory.
        env -u RUSTC -u RUSTDOC -u RUSTC_BOOTSTRAP -u CARGO_TARGET_DIR \
            -u CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER -u CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER \
            bash -c 'cargo build --quiet -p sallyport-relay --bins &&
                SALLYPORT_WINDOWS_AGENT="$1" cargo nextest run --profile wine' _ "$exe"
        ;;
    msi)
        # The MSI (scripts/msi.sh, msitools): `msi` packages the .exe the e2e build made (quick;
        # what CI does), `msi --release` builds and packages the release .exe.
        if [ "${1:-}" = "--release" ]; then
            shift
            "${cargo[@]}" build --release "${build_std[@]}" -p sallyport-agent "$@"
            exe="$CARGO_TARGET_DIR/$target/release/sallyport-agent.exe"
        else
            "${cargo[@]}" build "${build_std[@]}" "${crates[@]}" --lib --bins --tests \
                --config 'profile.dev.package."*".opt-level=0' "$@"
            exe="$CARGO_TARGET_DIR/$target/debug/sallyport-agent.exe"
        fi
        ./scripts/msi.sh "$exe" "$CARGO_TARGET_DIR/sallyport-agent.msi"
        msiinfo suminfo "$CARGO_TARGET_DIR/sallyport-agent.msi"
        msiinfo export "$CARGO_TARGET_DIR/sallyport-agent.msi" ServiceInstall | tail -n +4
        ;;
    prefix)
        # Prepares the wine prefix (with the stand-ins) and prints its path.
        prepare_wine
        echo "$WINEPREFIX"
        ;;
    *)
        echo "usage: $0 build|check|test|e2e|msi|prefix [cargo arguments]" >&2
        exit 2
        ;;
esac
