# Stops and removes the Sallyport agent service. Config and identity in ProgramData stay unless
# -RemoveData is given.
#   powershell -ExecutionPolicy Bypass -File uninstall.ps1 [-RemoveData]
param(
    [switch] $RemoveData,
    [string] $InstallDir = (Join-Path $env:ProgramFiles "Sallyport")
)
$ErrorActionPreference = "Stop"
$installed = Join-Path $InstallDir "sallyport-agent.exe"
if (Test-Path $installed) {
    & $installed service uninstall
} else {
    sc.exe delete sallyport-agent | Out-Null
}
Remove-Item -Force -Recurse -ErrorAction SilentlyContinue $InstallDir
if ($RemoveData) {
    Remove-Item -Force -Recurse (Join-Path $env:ProgramData "Sallyport")
    Write-Host "Removed the service, the program and its data."
} else {
    Write-Host "Removed the service and the program; $env:ProgramData\Sallyport (config, identity, logs) stays."
}
