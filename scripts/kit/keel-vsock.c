// keel-vsock: the vsock test tool of the guest kit (built static by
// build-kit.sh, so it runs in the L2 initramfs and in L1 alike).
//
//   keel-vsock listen PORT            guest: accept one AF_VSOCK stream on PORT
//                                     and echo it back until end of file
//   keel-vsock connect CID PORT       guest: connect to CID:PORT, copy stdin to
//                                     it and it to stdout
//   keel-vsock uds-connect PATH PORT  host: connect to keel-vmm's hybrid vsock
//                                     socket PATH, send "CONNECT PORT", print
//                                     the "OK n" reply to stderr, then copy
//                                     stdin to it and it to stdout
//   keel-vsock uds-echo PATH          host: listen on the unix socket PATH
//                                     (keel-vmm connects to PATH for a guest
//                                     dialing the host), echo one connection
//
// Exit status 0 on success, 1 with a message on stderr otherwise.
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char* what) {
  fprintf(stderr, "keel-vsock: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    data += n;
    size -= (size_t)n;
  }
  return 0;
}

// Copies stdin to sock and sock to stdout; half-closes sock at stdin's end
// and returns when sock reaches end of file.
static void pump(int sock) {
  char buffer[65536];
  int stdin_open = 1;
  for (;;) {
    struct pollfd fds[2] = {{sock, POLLIN, 0}, {0, POLLIN, 0}};
    if (poll(fds, stdin_open ? 2 : 1, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (fds[0].revents) {
      ssize_t n = read(sock, buffer, sizeof(buffer));
      if (n < 0) die("read socket");
      if (n == 0) return;
      if (write_all(1, buffer, (size_t)n) < 0) die("write stdout");
    }
    if (stdin_open && fds[1].revents) {
      ssize_t n = read(0, buffer, sizeof(buffer));
      if (n < 0) die("read stdin");
      if (n == 0) {
        stdin_open = 0;
        shutdown(sock, SHUT_WR);
      } else if (write_all(sock, buffer, (size_t)n) < 0) {
        die("write socket");
      }
    }
  }
}

static void echo(int sock) {
  char buffer[65536];
  for (;;) {
    ssize_t n = read(sock, buffer, sizeof(buffer));
    if (n < 0) die("read");
    if (n == 0) return;
    if (write_all(sock, buffer, (size_t)n) < 0) die("write");
  }
}

static struct sockaddr_un unix_address(const char* path) {
  struct sockaddr_un address;
  memset(&address, 0, sizeof(address));
  address.sun_family = AF_UNIX;
  if (strlen(path) >= sizeof(address.sun_path)) {
    fprintf(stderr, "keel-vsock: socket path too long: %s\n", path);
    exit(1);
  }
  strcpy(address.sun_path, path);
  return address;
}

int main(int argc, char** argv) {
  if (argc == 3 && strcmp(argv[1], "listen") == 0) {
    int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (sock < 0) die("socket AF_VSOCK");
    struct sockaddr_vm address = {.svm_family = AF_VSOCK,
                                  .svm_port = (unsigned)atoi(argv[2]),
                                  .svm_cid = VMADDR_CID_ANY};
    if (bind(sock, (struct sockaddr*)&address, sizeof(address)) < 0) die("bind");
    if (listen(sock, 1) < 0) die("listen");
    printf("KEEL-VSOCK-LISTENING %s\n", argv[2]);
    fflush(stdout);
    int peer = accept(sock, NULL, NULL);
    if (peer < 0) die("accept");
    echo(peer);
    return 0;
  }
  if (argc == 4 && strcmp(argv[1], "connect") == 0) {
    int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (sock < 0) die("socket AF_VSOCK");
    struct sockaddr_vm address = {.svm_family = AF_VSOCK,
                                  .svm_port = (unsigned)atoi(argv[3]),
                                  .svm_cid = (unsigned)atoi(argv[2])};
    if (connect(sock, (struct sockaddr*)&address, sizeof(address)) < 0) die("connect");
    pump(sock);
    return 0;
  }
  if (argc == 4 && strcmp(argv[1], "uds-connect") == 0) {
    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    if (sock < 0) die("socket AF_UNIX");
    struct sockaddr_un address = unix_address(argv[2]);
    if (connect(sock, (struct sockaddr*)&address, sizeof(address)) < 0) die("connect");
    char request[64];
    snprintf(request, sizeof(request), "CONNECT %s\n", argv[3]);
    if (write_all(sock, request, strlen(request)) < 0) die("write CONNECT");
    // The reply line comes byte by byte so no payload is read with it.
    char line[64];
    size_t used = 0;
    while (used + 1 < sizeof(line)) {
      ssize_t n = read(sock, line + used, 1);
      if (n <= 0) {
        fprintf(stderr, "keel-vsock: connection closed before the OK line\n");
        return 1;
      }
      if (line[used++] == '\n') break;
    }
    line[used] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
      fprintf(stderr, "keel-vsock: unexpected reply: %s", line);
      return 1;
    }
    fprintf(stderr, "%s", line);
    pump(sock);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "uds-echo") == 0) {
    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    if (sock < 0) die("socket AF_UNIX");
    struct sockaddr_un address = unix_address(argv[2]);
    unlink(argv[2]);
    if (bind(sock, (struct sockaddr*)&address, sizeof(address)) < 0) die("bind");
    if (listen(sock, 1) < 0) die("listen");
    int peer = accept(sock, NULL, NULL);
    if (peer < 0) die("accept");
    echo(peer);
    return 0;
  }
  fprintf(stderr,
          "usage: keel-vsock listen PORT | connect CID PORT | uds-connect PATH PORT | "
          "uds-echo PATH\n");
  return 1;
}
