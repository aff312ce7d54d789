// Durable file writes, shared by everything that writes data a user must not lose (token
// shards, llm.c checkpoints, our checkpoints): every byte checked, fsync before close, and for
// atomic writes a temporary name published by rename, so a crash or a full disk never leaves a
// torn file under the real name. Errors are UserErrors naming the file and the system's reason.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

namespace ulysses {

// Writes all `bytes` (retrying short writes and EINTR); UserError on failure.
void write_all(int fd, const void* data, size_t bytes, const std::string& path);

// The body writes the file's contents through write_all(fd, ..., path).
using FileBody = std::function<void(int fd, const std::string& path)>;

// Creates (or truncates) `path`, runs `body`, fsyncs and closes it.
void write_file_synced(const std::string& path, const FileBody& body);

// Writes `<path>.tmp.<pid>` like write_file_synced, then renames it over `path`. On any failure
// the temporary file is removed and `path` is untouched.
void write_file_atomically(const std::string& path, const FileBody& body);

// fsync of a directory, so a rename or a new file in it is durable.
void fsync_directory(const std::string& path);

}  // namespace ulysses
