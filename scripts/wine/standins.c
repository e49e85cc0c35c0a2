/*
 * Stand-ins for what Debian's wine 8 lacks and Windows 10 has, for running the Windows build
 * under wine in tests. Built by scripts/windows.sh into the test prefix's
 * system32\bcryptprimitives.dll; never shipped, never part of sallyport-agent.exe.
 *
 * 1. ProcessPrng (bcryptprimitives.dll), which Rust's std imports and wine 8 does not export:
 *    backed by RtlGenRandom.
 * 2. Two socket options quinn-udp uses on every QUIC socket and gives up on the socket when
 *    refused, which Windows 10 accepts and wine 8 refuses:
 *    - setting IP_RECVECN / IPV6_RECVECN: a refusal of exactly these reads as success (ECN bits
 *      are then simply not reported, as on a path that clears them);
 *    - reading IPV6_V6ONLY on an IPv4 socket: answered "0" (the socket is IPv4 either way, which
 *      is all quinn-udp asks it for).
 *    The stand-in rewrites the executable's imports of ws2_32!setsockopt and getsockopt at load.
 *    Every other option, and every other failure, passes through as is.
 */
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <ntsecapi.h>
#include <stdio.h>
#include <string.h>

#ifndef IP_RECVECN
#define IP_RECVECN 50
#endif
#ifndef IPV6_RECVECN
#define IPV6_RECVECN 50
#endif

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len) {
        ULONG chunk = len > 0x7fffffff ? 0x7fffffff : (ULONG)len;
        if (!RtlGenRandom(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

typedef int(WSAAPI *setsockopt_fn)(SOCKET, int, int, const char *, int);
static setsockopt_fn wine_setsockopt;

static int WSAAPI setsockopt_accepting_ecn(SOCKET s, int level, int name, const char *value, int len) {
    int rc = wine_setsockopt(s, level, name, value, len);
    int ecn = (level == IPPROTO_IP && name == IP_RECVECN) || (level == IPPROTO_IPV6 && name == IPV6_RECVECN);
    if (rc != 0 && ecn) {
        static LONG said;
        if (InterlockedExchange(&said, 1) == 0) {
            fprintf(stderr, "wine stand-in: wine refused IP_RECVECN (WSA error %d); accepted without effect\n",
                    WSAGetLastError());
        }
        WSASetLastError(0);
        return 0;
    }
    return rc;
}

typedef int(WSAAPI *getsockopt_fn)(SOCKET, int, int, char *, int *);
static getsockopt_fn wine_getsockopt;

static int WSAAPI getsockopt_v6only_on_ipv4(SOCKET s, int level, int name, char *value, int *len) {
    int rc = wine_getsockopt(s, level, name, value, len);
    int error = rc != 0 ? WSAGetLastError() : 0;
    if (rc != 0 && level == IPPROTO_IPV6 && name == IPV6_V6ONLY && value && len && *len >= 1) {
        struct sockaddr_storage local;
        int size = sizeof local;
        if (getsockname(s, (struct sockaddr *)&local, &size) == 0 && local.ss_family == AF_INET) {
            static LONG said;
            if (InterlockedExchange(&said, 1) == 0) {
                fprintf(stderr, "wine stand-in: wine refused IPV6_V6ONLY on an IPv4 socket (WSA error %d); answered 0\n",
                        error);
            }
            memset(value, 0, (size_t)*len);
            WSASetLastError(0);
            return 0;
        }
        WSASetLastError(error);
    }
    return rc;
}

/* Swaps one import slot for `replacement`, keeping what it pointed at in `*original`. */
static void swap_slot(IMAGE_THUNK_DATA *slot, ULONG_PTR replacement, void **original) {
    DWORD old;
    if (slot->u1.Function == replacement) return;
    if (!VirtualProtect(&slot->u1.Function, sizeof slot->u1.Function, PAGE_READWRITE, &old)) return;
    *original = (void *)slot->u1.Function;
    slot->u1.Function = replacement;
    VirtualProtect(&slot->u1.Function, sizeof slot->u1.Function, old, &old);
}

/* Points the module's imports of ws2_32!setsockopt and getsockopt (by name, or by their ordinals
 * 21 and 7) at the wrappers. */
static void patch_imports(HMODULE module) {
    BYTE *base = (BYTE *)module;
    IMAGE_NT_HEADERS *nt = (IMAGE_NT_HEADERS *)(base + ((IMAGE_DOS_HEADER *)base)->e_lfanew);
    IMAGE_DATA_DIRECTORY dir = nt->OptionalHeader.DataDirectory[IMAGE_DIRECTORY_ENTRY_IMPORT];
    if (!dir.VirtualAddress) return;
    for (IMAGE_IMPORT_DESCRIPTOR *imp = (IMAGE_IMPORT_DESCRIPTOR *)(base + dir.VirtualAddress); imp->Name; imp++) {
        if (_stricmp((const char *)(base + imp->Name), "ws2_32.dll") != 0) continue;
        DWORD lookup = imp->OriginalFirstThunk ? imp->OriginalFirstThunk : imp->FirstThunk;
        IMAGE_THUNK_DATA *names = (IMAGE_THUNK_DATA *)(base + lookup);
        IMAGE_THUNK_DATA *slots = (IMAGE_THUNK_DATA *)(base + imp->FirstThunk);
        for (; names->u1.AddressOfData; names++, slots++) {
            int set, get;
            if (IMAGE_SNAP_BY_ORDINAL(names->u1.Ordinal)) {
                set = IMAGE_ORDINAL(names->u1.Ordinal) == 21;
                get = IMAGE_ORDINAL(names->u1.Ordinal) == 7;
            } else {
                const char *name = (const char *)((IMAGE_IMPORT_BY_NAME *)(base + names->u1.AddressOfData))->Name;
                set = strcmp(name, "setsockopt") == 0;
                get = strcmp(name, "getsockopt") == 0;
            }
            if (set) swap_slot(slots, (ULONG_PTR)setsockopt_accepting_ecn, (void **)&wine_setsockopt);
            if (get) swap_slot(slots, (ULONG_PTR)getsockopt_v6only_on_ipv4, (void **)&wine_getsockopt);
        }
    }
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved) {
    (void)instance;
    (void)reserved;
    if (reason == DLL_PROCESS_ATTACH) patch_imports(GetModuleHandleA(NULL));
    return TRUE;
}
