# Stops and removes the Sallyport agent service. Config and identity in ProgramData stay unless
# -RemoveData is given.
#   powershell -ExecutionPolicy Bypass -File uninstall.ps1 [-RemoveData]
param(
    [switch] $RemoveData,
    [string] $InstallDir = (Join-Path $env:ProgramFiles "Sallyport")
)
$ErrorActionPreference = "Stop"
$installed = Join-Path $InstallDir "sallyport-agent.exe"
if ($RemoveData -and -not (Test-Path $installed)) {
    # Its data is removed by the program itself, which never follows a junction or symbolic link
    # inside the folder (Remove-Item -Recurse in Windows PowerShell 5.1 may).
    throw "$installed is missing: cannot remove the data safely; delete $env:ProgramData\Sallyport by hand (rmdir /s)"
}
if ($RemoveData) {
    & $installed service remove-data --dir (Join-Path $env:ProgramData "Sallyport")
    if ($LASTEXITCODE -ne 0) { throw "removing the data failed" }
}
if (Test-Path $installed) {
    & $installed service uninstall
} else {
    sc.exe delete sallyport-agent | Out-Null
}
Remove-Item -Force -Recurse -ErrorAction SilentlyContinue $InstallDir
if ($RemoveData) {
    Write-Host "Removed the service, the program and its data."
} else {
    Write-Host "Removed the service and the program; $env:ProgramData\Sallyport (config, identity, logs) stays."
}
