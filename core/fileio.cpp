#include "core/fileio.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "core/base/error.h"

namespace ulysses {

void write_all(int fd, const void* data, size_t bytes, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw_user_error("{}: write failed: {}", path, std::strerror(n < 0 ? errno : ENOSPC));
    p += n;
    bytes -= size_t(n);
  }
}

void write_file_synced(const std::string& path, const FileBody& body) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw_user_error("{}: cannot create: {}", path, std::strerror(errno));
  try {
    body(fd, path);
    if (::fsync(fd) != 0) throw_user_error("{}: fsync failed: {}", path, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) throw_user_error("{}: close failed: {}", path, std::strerror(errno));
}

void write_file_atomically(const std::string& path, const FileBody& body) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  try {
    write_file_synced(tmp, body);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw_user_error("{}: cannot rename {} into place: {}", path, tmp, std::strerror(e));
  }
}

void fsync_directory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_user_error("{}: cannot open directory: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw_user_error("{}: fsync of the directory failed: {}", path, std::strerror(errno));
}

}  // namespace ulysses
