#!/bin/sh
# Runs inside a WSL2 distribution and tells the Sallyport agent on Windows the distribution's
# address, which changes on every WSL start. The agent uses it for wsl://DISTRO:PORT targets when
# localhost forwarding does not carry a port, and for UDP.
#
# Install once, as root inside the distribution (install.ps1 copies this file next to agent.toml):
#   sudo sh /mnt/c/ProgramData/Sallyport/sallyport-wsl-helper.sh install
# It then starts at every WSL start (the [boot] command of /etc/wsl.conf) and rewrites
# C:\ProgramData\Sallyport\wsl\DISTRO.addr every 30 seconds while the distribution runs.
set -eu

dir=/mnt/c/ProgramData/Sallyport/wsl
installed=/usr/local/sbin/sallyport-wsl-helper
name_file=/etc/sallyport-wsl-distro

case "${1:-run}" in
install)
    distro=${WSL_DISTRO_NAME:?"run this inside WSL (WSL_DISTRO_NAME is not set)"}
    install -m 0755 "$0" "$installed"
    printf '%s\n' "$distro" > "$name_file"
    if grep -q "$installed" /etc/wsl.conf 2>/dev/null; then
        echo "already in /etc/wsl.conf"
    elif grep -q '^\[boot\]' /etc/wsl.conf 2>/dev/null; then
        echo "/etc/wsl.conf has a [boot] section: add '$installed start &' to its command yourself" >&2
        exit 1
    else
        printf '\n[boot]\ncommand = "%s start"\n' "$installed" >> /etc/wsl.conf
        echo "added to /etc/wsl.conf; it runs from the next WSL start (wsl --shutdown to restart now)"
    fi
    "$installed" start
    ;;
start)
    nohup "$installed" run >/dev/null 2>&1 &
    ;;
run)
    distro=$(cat "$name_file")
    mkdir -p "$dir"
    while :; do
        # Written whole, then renamed: the agent never reads half a line.
        if hostname -I > "$dir/$distro.addr.tmp" 2>/dev/null; then
            mv -f "$dir/$distro.addr.tmp" "$dir/$distro.addr"
        fi
        sleep 30
    done
    ;;
*)
    echo "usage: $0 install|start|run" >&2
    exit 2
    ;;
esac
