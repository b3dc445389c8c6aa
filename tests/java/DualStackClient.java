// A real dual-stack client for mesh's end-to-end tests (tests/tests/dual_stack.rs), run with the
// JDK's source launcher inside the test's cgroup:
//
//   java --add-opens java.base/sun.nio.ch=ALL-UNNAMED DualStackClient.java connect HOST PORT N
//       N sequential connects with java.net.Socket: each connects, reads the reply's first line
//       (a backend's name) and closes. Prints the line, or `ERR <reason>`, per connect. On stderr
//       it ends with `dual-stack-client: families AF_INET6=<n> AF_INET=<n> unknown=<n>`: the
//       family of each connected socket, looked up by its local port in /proc/self/net/tcp6
//       and /proc/self/net/tcp.
//   java --add-opens java.base/sun.nio.ch=ALL-UNNAMED DualStackClient.java peer HOST PORT
//       One connect with a SocketChannel. Prints `peer <getpeername()>`, `family <AF_INET6|..>`,
//       `kernel_peer <the peer in /proc/self/net/tcp6: where the connection really goes>` and
//       `reply <first line>`, one per line.
//
// On Linux the JDK makes AF_INET6 sockets with IPV6_V6ONLY=0 and connects them to
// ::ffff:<IPv4 address> for an IPv4 destination; the family lines show that this really happened.
// getpeername() is called through the JDK's own sun.nio.ch.Net (hence --add-opens): Socket and
// SocketChannel only remember the address they were asked to connect to. The JDK shows a
// v4-mapped peer as the plain IPv4 address.
//
// Every connect and read is bounded by a 2 s timeout; the test bounds the whole run.

import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.IOException;
import java.io.InputStreamReader;
import java.lang.reflect.Method;
import java.net.ConnectException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

public class DualStackClient {
    private static final int TIMEOUT_MS = 2000;

    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            usage();
        }
        String host = args[1];
        int port = Integer.parseInt(args[2]);
        switch (args[0]) {
            case "connect" -> {
                if (args.length != 4) {
                    usage();
                }
                connect(host, port, Integer.parseInt(args[3]));
            }
            case "peer" -> peer(host, port);
            default -> usage();
        }
    }

    private static void usage() {
        System.err.println("usage: DualStackClient connect HOST PORT N | peer HOST PORT");
        System.exit(2);
    }

    private static void connect(String host, int port, int count) {
        int v6 = 0;
        int v4 = 0;
        int unknown = 0;
        for (int i = 0; i < count; i++) {
            try (Socket socket = new Socket()) {
                socket.connect(new InetSocketAddress(host, port), TIMEOUT_MS);
                socket.setSoTimeout(TIMEOUT_MS);
                switch (family(socket.getLocalPort())[0]) {
                    case "AF_INET6" -> v6++;
                    case "AF_INET" -> v4++;
                    default -> unknown++;
                }
                BufferedReader in = new BufferedReader(
                        new InputStreamReader(socket.getInputStream(), StandardCharsets.UTF_8));
                String line = in.readLine();
                System.out.println(line == null || line.isEmpty() ? "ERR empty" : line);
            } catch (Exception e) {
                System.out.println("ERR " + reason(e));
            }
        }
        System.out.flush();
        System.err.printf("dual-stack-client: families AF_INET6=%d AF_INET=%d unknown=%d%n",
                v6, v4, unknown);
    }

    private static void peer(String host, int port) throws Exception {
        try (SocketChannel channel = SocketChannel.open()) {
            channel.socket().connect(new InetSocketAddress(host, port), TIMEOUT_MS);
            channel.socket().setSoTimeout(TIMEOUT_MS);
            System.out.println("peer " + getpeername(channel));
            int localPort = ((InetSocketAddress) channel.getLocalAddress()).getPort();
            String[] family = family(localPort);
            System.out.println("family " + family[0]);
            System.out.println("kernel_peer " + family[1]);
            BufferedReader in = new BufferedReader(new InputStreamReader(
                    channel.socket().getInputStream(), StandardCharsets.UTF_8));
            String line = in.readLine();
            System.out.println("reply " + (line == null || line.isEmpty() ? "ERR empty" : line));
        } catch (Exception e) {
            System.out.println("ERR " + reason(e));
        }
    }

    /// getpeername(2) of the channel's socket, as `ip:port`.
    private static String getpeername(SocketChannel channel) {
        try {
            Method getFd = channel.getClass().getMethod("getFD");
            getFd.setAccessible(true);
            FileDescriptor fd = (FileDescriptor) getFd.invoke(channel);
            Method remote = Class.forName("sun.nio.ch.Net")
                    .getDeclaredMethod("remoteAddress", FileDescriptor.class);
            remote.setAccessible(true);
            InetSocketAddress peer = (InetSocketAddress) remote.invoke(null, fd);
            return peer.getAddress().getHostAddress() + ":" + peer.getPort();
        } catch (ReflectiveOperationException | RuntimeException e) {
            return "ERR getpeername: " + e;
        }
    }

    /// {family, kernel's peer address} of the TCP socket bound to `localPort`, from
    /// /proc/self/net/tcp6 (AF_INET6 sockets, IPv4 traffic included) or /proc/self/net/tcp.
    private static String[] family(int localPort) throws IOException {
        String wanted = String.format(":%04X", localPort);
        for (String[] table : new String[][] {{"/proc/self/net/tcp6", "AF_INET6"},
                {"/proc/self/net/tcp", "AF_INET"}}) {
            List<String> lines = Files.readAllLines(Path.of(table[0]));
            for (String line : lines.subList(1, lines.size())) {
                String[] fields = line.trim().split("\\s+");
                if (fields.length > 2 && fields[1].endsWith(wanted)) {
                    return new String[] {table[1], procAddress(fields[2])};
                }
            }
        }
        return new String[] {"unknown", "unknown"};
    }

    /// A /proc/net/tcp{,6} address (`HEX:PORT`, each 32-bit word of the IP printed as a
    /// host-order number) as `ip:port` or `[ipv6]:port`; v4-mapped as `[::ffff:a.b.c.d]:port`.
    private static String procAddress(String field) {
        String[] parts = field.split(":");
        int port = Integer.parseInt(parts[1], 16);
        byte[] ip = new byte[parts[0].length() / 2];
        for (int word = 0; word < ip.length / 4; word++) {
            long value = Long.parseLong(parts[0].substring(word * 8, word * 8 + 8), 16);
            for (int b = 0; b < 4; b++) {
                ip[word * 4 + b] = (byte) (value >> (8 * b));
            }
        }
        if (ip.length == 4) {
            return dotted(ip, 0) + ":" + port;
        }
        boolean mapped = true;
        for (int i = 0; i < 12; i++) {
            mapped &= ip[i] == (i < 10 ? 0 : (byte) 0xff);
        }
        if (mapped) {
            return "[::ffff:" + dotted(ip, 12) + "]:" + port;
        }
        StringBuilder out = new StringBuilder("[");
        for (int i = 0; i < 16; i += 2) {
            out.append(i == 0 ? "" : ":")
                    .append(Integer.toHexString(((ip[i] & 0xff) << 8) | (ip[i + 1] & 0xff)));
        }
        return out.append("]:").append(port).toString();
    }

    private static String dotted(byte[] ip, int at) {
        return (ip[at] & 0xff) + "." + (ip[at + 1] & 0xff) + "." + (ip[at + 2] & 0xff) + "."
                + (ip[at + 3] & 0xff);
    }

    private static String reason(Exception e) {
        if (e instanceof ConnectException && String.valueOf(e.getMessage()).contains("refused")) {
            return "ECONNREFUSED";
        }
        if (e instanceof SocketTimeoutException) {
            return "ETIMEDOUT";
        }
        return e.getClass().getSimpleName() + ": " + e.getMessage();
    }
}
