// Addresses: what stays on this machine (a plain listener or URL there carries no secret
// across a network).
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}
