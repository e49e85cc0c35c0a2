# Installs the Sallyport agent as a Windows service from an agent bundle.
# Run in an elevated PowerShell from the folder holding sallyport-agent.exe and the bundle:
#   powershell -ExecutionPolicy Bypass -File install.ps1 -Bundle .\winbox-bundle
param(
    # The folder `sallyport-relay agent add` wrote: agent.toml, ca.crt, agent.crt, agent.key.
    [Parameter(Mandatory = $true)] [string] $Bundle,
    [string] $Exe = (Join-Path $PSScriptRoot "sallyport-agent.exe"),
    [string] $InstallDir = (Join-Path $env:ProgramFiles "Sallyport")
)
$ErrorActionPreference = "Stop"

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw "Run this script in an elevated PowerShell (Run as administrator)."
}
if (-not (Test-Path $Exe)) { throw "sallyport-agent.exe not found at $Exe (pass -Exe)." }
$config = Join-Path $Bundle "agent.toml"
if (-not (Test-Path $config)) { throw "No agent.toml in $Bundle." }

# The program goes to Program Files; config and identity to ProgramData (the service copies them).
New-Item -ItemType Directory -Force -Path $InstallDir | Out-Null
$installed = Join-Path $InstallDir "sallyport-agent.exe"
Copy-Item -Force $Exe $installed

# Validate first: a wrong path or an expired certificate stops here, with the reason.
& $installed check --config $config
if ($LASTEXITCODE -ne 0) { throw "The bundle does not check out (see above)." }

& $installed service install --config $config
if ($LASTEXITCODE -ne 0) { throw "Service installation failed (see above)." }
& $installed service start
if ($LASTEXITCODE -ne 0) { throw "The service did not start (see above)." }

Write-Host ""
Write-Host "Sallyport agent installed and started."
Write-Host "  status:  & '$installed' service status      (or: Get-Service sallyport-agent)"
Write-Host "  logs:    $env:ProgramData\Sallyport\logs\    and Event Viewer > Windows Logs > Application, source 'Sallyport Agent'"
Write-Host "  config:  $env:ProgramData\Sallyport\agent.toml (restart the service after editing)"
