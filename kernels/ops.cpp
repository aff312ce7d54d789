// Placeholder translation unit of the kernels library (device dispatch lives here).
namespace ulysses {}
