# Installs the Sallyport agent as a Windows service.
# Run in an elevated PowerShell from the folder holding sallyport-agent.exe, either with a join
# token (from `sallyport-relay token create --agent NAME`) saved in a file:
#   powershell -ExecutionPolicy Bypass -File install.ps1 -TokenFile .\join.token
# (-Token spjoin1.XXXX works too, but a command line is visible to every local user while it runs),
# or with an agent bundle (from `sallyport-relay agent add NAME`):
#   powershell -ExecutionPolicy Bypass -File install.ps1 -Bundle .\winbox-bundle
param(
    # A file holding the join token.
    [string] $TokenFile,
    [string] $Token,
    # The folder `sallyport-relay agent add` wrote: agent.toml, ca.crt, agent.crt, agent.key.
    [string] $Bundle,
    [string] $Exe = (Join-Path $PSScriptRoot "sallyport-agent.exe"),
    # Take in hand a %ProgramData%\Sallyport that someone else created before the install.
    [switch] $TakeOver,
    [string] $InstallDir = (Join-Path $env:ProgramFiles "Sallyport")
)
$ErrorActionPreference = "Stop"

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw "Run this script in an elevated PowerShell (Run as administrator)."
}
if (-not (Test-Path $Exe)) { throw "sallyport-agent.exe not found at $Exe (pass -Exe)." }
$given = @($TokenFile, $Token, $Bundle | Where-Object { $_ }).Count
if ($given -ne 1) { throw "Pass one of -TokenFile, -Token or -Bundle." }
if ($Token) { Write-Warning "-Token is visible to local users in the process list while this runs; -TokenFile keeps it out." }

# The program goes to Program Files; config, identity and logs to ProgramData.
New-Item -ItemType Directory -Force -Path $InstallDir | Out-Null
$installed = Join-Path $InstallDir "sallyport-agent.exe"
Copy-Item -Force $Exe $installed
$data = Join-Path $env:ProgramData "Sallyport"
# Before anything is written there: the folder is created (or its access reset) for SYSTEM and
# Administrators only, owned by Administrators; one that a standard user created first is refused
# unless -TakeOver.
$prepare = @("service", "prepare", "--dir", $data)
if ($TakeOver) { $prepare += "--take-over" }
& $installed @prepare
if ($LASTEXITCODE -ne 0) { throw "Cannot prepare $data (see above)." }

if ($TokenFile -or $Token) {
    # The key is generated here; the relay is checked against the CA hash in the token before the
    # token's secret is sent. The token reaches enroll through a file or standard input, never its
    # command line.
    if ($TokenFile) {
        & $installed enroll --token-file $TokenFile --dir $data
    } else {
        $Token | & $installed enroll --token-file - --dir $data
    }
    if ($LASTEXITCODE -ne 0) { throw "Enrollment failed (see above)." }
    $config = Join-Path $data "agent.toml"
} else {
    $config = Join-Path $Bundle "agent.toml"
    if (-not (Test-Path $config)) { throw "No agent.toml in $Bundle." }
}

# Validate first: a wrong path or an expired certificate stops here, with the reason.
& $installed check --config $config
if ($LASTEXITCODE -ne 0) { throw "The configuration does not check out (see above)." }

$install = @("service", "install", "--config", $config)
if ($TakeOver) { $install += "--take-over" }
& $installed @install
if ($LASTEXITCODE -ne 0) { throw "Service installation failed (see above)." }
# The folder's `wsl` folder is where the helper inside each WSL2 distribution
# (sallyport-wsl-helper.sh) writes the distribution's address, as the user who runs WSL: that user
# (this one) may write there, no one else but SYSTEM and Administrators.
$me = [Security.Principal.WindowsIdentity]::GetCurrent().User.Value
& $installed service prepare --dir $data --wsl-writer $me
if ($LASTEXITCODE -ne 0) { throw "Cannot prepare $data\wsl (see above)." }
& $installed service start
if ($LASTEXITCODE -ne 0) { throw "The service did not start (see above)." }

# The WSL helper script, for wsl:// targets (see docs/web-apps-and-udp.md).
Copy-Item -Force (Join-Path $PSScriptRoot "sallyport-wsl-helper.sh") $data -ErrorAction SilentlyContinue

Write-Host ""
Write-Host "Sallyport agent installed and started."
Write-Host "  services: edit $data\agent.toml ([services.NAME], [containers.NAME]), then Restart-Service sallyport-agent"
Write-Host "  status:   & '$installed' service status      (or: Get-Service sallyport-agent)"
Write-Host "  logs:     $data\logs\    and Event Viewer > Windows Logs > Application, source 'Sallyport Agent'"
