import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A real VM across a failover (issue 10's VM drill): QEMU under TCG boots Debian's cloud kernel
/// with a busybox initramfs built here, its disk a sync-replicated Ferry volume over NBD. The guest
/// counts: it reads the counter from the disk's first sector, then writes counter+1 with an fsync
/// (an NBD FLUSH) and only then prints it. `kill -9` of the primary site (and of its VM); `ferry
/// promote` on the second site runs the volume's `on-promote` hook, which boots the same VM from
/// that site's export; the VM reads back a counter at least the last one it printed as durable.
@Suite(.serialized)
struct VMDrillTests {
    /// The guest's /init: the virtio modules in dependency order, then the counter loop.
    static let guestInit = """
        #!/bin/busybox sh
        /bin/busybox --install -s /bin
        mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
        for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do insmod /lib/$m.ko; done
        n=0; while [ ! -b /dev/vda ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
        c=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -dc 0-9)
        [ -z "$c" ] && c=0
        echo "FERRY-VM start $c"
        while true; do
          c=$((c+1))
          if printf '%-511s\\n' "$c" | dd of=/dev/vda bs=512 count=1 oflag=direct conv=fsync,notrunc 2>/dev/null; then
            echo "FERRY-VM durable $c"
          else
            echo "FERRY-VM write failed"; c=$((c-1)); sleep 1
          fi
        done

        """

    /// Debian's cloud kernel and its modules directory, or a recorded issue naming the package.
    static func kernel() throws -> (vmlinuz: String, modules: String) {
        let boot = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
        guard let image = boot.filter({ $0.hasPrefix("vmlinuz-") && $0.hasSuffix("-cloud-amd64") }).sorted().last else {
            Issue.record("no cloud kernel in /boot; install it with: apt-get install -y linux-image-cloud-amd64  (make test does this)")
            throw TestFailure("kernel missing")
        }
        let version = String(image.dropFirst("vmlinuz-".count))
        return ("/boot/\(image)", "/lib/modules/\(version)/kernel/drivers")
    }

    /// Builds the initramfs (busybox-static, the virtio modules, /init) under `dir`.
    static func initramfs(in dir: String) throws -> String {
        let busybox = try requireTool("busybox", package: "busybox-static")
        _ = try requireTool("cpio", package: "cpio")
        let (_, modules) = try kernel()
        let root = dir + "/root"
        for sub in ["bin", "lib", "proc", "sys", "dev"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(sub)", withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: busybox, toPath: root + "/bin/busybox")
        for module in ["virtio/virtio_ring", "virtio/virtio", "virtio/virtio_pci_modern_dev", "virtio/virtio_pci_legacy_dev",
                       "virtio/virtio_pci", "block/virtio_blk"] {
            let name = String(module.split(separator: "/").last!)
            try FileManager.default.copyItem(atPath: "\(modules)/\(module).ko", toPath: "\(root)/lib/\(name).ko")
        }
        try guestInit.write(toFile: root + "/init", atomically: true, encoding: .utf8)
        chmod(root + "/init", 0o755)
        let archive = dir + "/initrd.gz"
        let packed = try run("/bin/sh", ["-c", "cd \(root) && find . | cpio -o -H newc 2>/dev/null | gzip -1 > \(archive)"], expect: nil)
        guard packed.status == 0 else { throw TestFailure("building the initramfs failed: \(packed.stderr)") }
        return archive
    }

    /// A script that boots the VM on the NBD URI `$1`, detached (`-daemonize`), with its console
    /// in `$2` and its PID in `$3`: the hook returns at once and the VM outlives it. QEMU's own
    /// output goes to `$2.qemu` (the daemon keeps its descriptors: a pipe would never close).
    static func bootScript(in dir: String, initrd: String) throws -> String {
        let qemu = try requireTool("qemu-system-x86_64", package: "qemu-system-x86")
        let (vmlinuz, _) = try kernel()
        let script = dir + "/boot-vm.sh"
        try """
            #!/bin/bash
            # The daemonized QEMU must not keep descriptors of whoever started it (a pipe, or the
            # socket Foundation's Process watches for the child's exit, would never close).
            for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done 2>/dev/null
            exec \(qemu) -M q35 -accel tcg -m 256 -nodefaults -no-user-config -display none \\
              -kernel \(vmlinuz) -initrd \(initrd) -append "console=ttyS0 panic=-1 quiet" \\
              -drive file="$1",format=raw,if=virtio,cache=none \\
              -serial file:"$2" -pidfile "$3" -daemonize -no-reboot </dev/null >>"$2.qemu" 2>&1

            """.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        return script
    }

    static func console(_ path: String) -> [String] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(whereSeparator: \.isNewline).map(String.init)
    }

    /// The last "durable N" the guest printed (0 before any).
    static func lastDurable(_ path: String) -> Int {
        console(path).compactMap { $0.hasPrefix("FERRY-VM durable ") ? Int($0.dropFirst("FERRY-VM durable ".count)) : nil }.last ?? 0
    }

    static func start(_ path: String) -> Int? {
        console(path).first { $0.hasPrefix("FERRY-VM start ") }.flatMap { Int($0.dropFirst("FERRY-VM start ".count)) }
    }

    static func killVM(_ pidFile: String) {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return }
        kill(pid, SIGKILL)
    }

    /// How a drill starts and kills the VMs: QEMU directly, or libvirt.
    struct Hypervisor {
        /// Starts the VM at east on `uri`.
        var startEast: (_ uri: String) throws -> Void
        /// Kills the VM at east (the site died, and its VM with it).
        var killEast: () -> Void
        var cleanup: () -> Void
    }

    /// The drill: the VM counts at east; east and its VM die; west is promoted and its hook boots
    /// the VM there, which must read back every counter it printed as durable.
    /// `hook`: the `on-promote` command that boots the VM on the promoted site's export.
    func drill(_ name: String, hook: String, consoles: (east: String, west: String),
               hypervisor make: (_ sites: ReplicationSites) throws -> Hypervisor) throws {
        var hypervisor: Hypervisor?
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M", onPromote: hook)
        defer {
            hypervisor?.cleanup()
            sites.stopAll()
        }
        hypervisor = try make(sites)
        try sites.startAll()
        sites.waitInSync()

        try hypervisor!.startEast(sites.east.uri("vm1"))
        let counting = eventually(.seconds(180)) { Self.lastDurable(consoles.east) >= 30 }
        #expect(counting, "the VM at east did not count to 30: \(Self.console(consoles.east).suffix(5))")
        guard counting else { return }

        let killed = ContinuousClock.now
        sites.east.kill9()
        hypervisor!.killEast()
        let printed = Self.lastDurable(consoles.east)

        var promoted: RunResult?
        var promoteStarted = ContinuousClock.now
        #expect(eventually(.seconds(30)) {
            promoteStarted = ContinuousClock.now
            promoted = try? run(try ferryBinary(), ["promote", "vm1", "--config", sites.west.configPath], expect: nil)
            return promoted?.status == 0
        }, "promote failed: \(promoted?.stderr ?? "")")
        let promotedAt = ContinuousClock.now
        let answering = eventually(.seconds(10)) {
            (try? run("/usr/bin/env", ["nbdinfo", "--size", sites.west.uri("vm1")], expect: nil))?.status == 0
        }
        let exportAt = ContinuousClock.now
        #expect(answering, "west's export does not answer after the promotion")
        #expect(promoted?.stdout.contains("on-promote hook started") == true, "\(promoted?.stdout ?? "")")
        let booted = eventually(.seconds(180)) { Self.start(consoles.west) != nil }
        let bootedAt = ContinuousClock.now
        #expect(booted, "the VM did not boot at west: \(Self.console(consoles.west).suffix(5))\n\(sites.west.log(tail: 20))")
        guard booted, let resumed = Self.start(consoles.west) else { return }
        #expect(resumed >= printed, "the VM at west read counter \(resumed), but \(printed) had been printed as durable at east")
        let counted = eventually(.seconds(60)) { Self.lastDurable(consoles.west) > resumed }
        #expect(counted, "the VM at west does not write: \(Self.console(consoles.west).suffix(5))")

        func seconds(_ d: Duration) -> String { String(format: "%.2f", Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18) }
        print("VM drill (\(name)): counter \(printed) printed durable at east before kill -9, \(resumed) read back at west; "
              + "kill to promote accepted \(seconds(promotedAt - killed)) s (promote itself \(seconds(promotedAt - promoteStarted)) s), "
              + "promote to export answering \(seconds(exportAt - promotedAt)) s, kill to the VM's first line at west "
              + "(RTO) \(seconds(bootedAt - killed)) s")
    }

    @Test func aVMBootsAtTheSecondSiteWithEveryCounterItSawDurable() throws {
        let work = TempDir()
        let initrd = try Self.initramfs(in: work.path)
        let boot = try Self.bootScript(in: work.path, initrd: initrd)
        let consoles = (east: work.path + "/east-console.log", west: work.path + "/west-console.log")
        let pids = (east: work.path + "/east-vm.pid", west: work.path + "/west-vm.pid")
        try drill("QEMU", hook: "\(boot) \"$FERRY_NBD_URI\" \(consoles.west) \(pids.west)", consoles: consoles) { _ in
            Hypervisor(startEast: { uri in _ = try run(boot, [uri, consoles.east, pids.east]) },
                       killEast: { Self.killVM(pids.east) },
                       cleanup: { Self.killVM(pids.east); Self.killVM(pids.west) })
        }
    }

    /// The same drill as operators run VMs: libvirt domains (TCG, `type='qemu'`) whose disk is a
    /// `<disk type='network'>` on the site's NBD export, the hook running `virsh start`.
    @Test func theSameDrillThroughLibvirt() throws {
        let work = TempDir()
        chmod(work.path, 0o755)   // libvirt's QEMU runs as libvirt-qemu: it reads the initramfs, writes the consoles
        let initrd = try Self.initramfs(in: work.path)
        chmod(initrd, 0o644)
        let daemons = try Libvirt.ensureRunning()
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let consoles = (east: work.path + "/east-console.log", west: work.path + "/west-console.log")
        let domains = (east: "ferry-drill-east-\(tag)", west: "ferry-drill-west-\(tag)")
        defer {
            for d in [domains.east, domains.west] {
                _ = try? Libvirt.virsh(["destroy", d], expect: nil)
                _ = try? Libvirt.virsh(["undefine", d], expect: nil)
            }
            daemons.stop()
        }
        try drill("libvirt", hook: "virsh -c qemu:///system start \(domains.west)", consoles: consoles) { sites in
            let (vmlinuz, _) = try Self.kernel()
            for (domain, site, console) in [(domains.east, sites.east, consoles.east), (domains.west, sites.west, consoles.west)] {
                let xml = work.path + "/\(domain).xml"
                try Libvirt.domainXML(name: domain, kernel: vmlinuz, initrd: initrd, nbdPort: site.nbdPort, export: "vm1",
                                      console: console).write(toFile: xml, atomically: true, encoding: .utf8)
                _ = try Libvirt.virsh(["define", xml])
            }
            return Hypervisor(startEast: { _ in _ = try Libvirt.virsh(["start", domains.east]) },
                              killEast: { _ = try? Libvirt.virsh(["destroy", domains.east], expect: nil) },
                              cleanup: { _ = try? Libvirt.virsh(["destroy", domains.west], expect: nil) })
        }
    }
}

/// libvirt on a machine where systemd is not PID 1: `virtlogd -d` then `libvirtd -d`, by hand.
enum Libvirt {
    /// The daemons this test started (stopped by their PIDs), or none when they were running.
    /// SIGKILL: started through Foundation's Process they inherit its blocked signals, so they
    /// never see a SIGTERM (the domains are destroyed and undefined before).
    struct Started {
        var pids: [Int32]
        func stop() { for pid in pids { kill(pid, SIGKILL) } }
    }

    /// Bash that closes every descriptor above 2 (before `exec` of a daemon).
    static let closeDescriptors = "for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ \"$fd\" -gt 2 ] && eval \"exec $fd>&-\"; done 2>/dev/null; "

    static func virsh(_ args: [String], expect: Int32? = 0) throws -> RunResult {
        try run(try requireTool("virsh", package: "libvirt-clients"), ["-c", "qemu:///system"] + args, expect: expect)
    }

    static func pid(_ file: String) -> Int32? {
        (try? String(contentsOfFile: file, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    static func alive(_ pidFile: String) -> Bool { pid(pidFile).map { kill($0, 0) == 0 } ?? false }

    static func ensureRunning() throws -> Started {
        _ = try requireTool("virsh", package: "libvirt-clients")
        var started: [Int32] = []
        for (daemon, pidFile) in [("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")] where !alive(pidFile) {
            guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/\(daemon)") else {
                Issue.record("\(daemon) is not installed; install it with: apt-get install -y libvirt-daemon-system  (make test does this)")
                throw TestFailure("\(daemon) missing")
            }
            // Through bash, closing every descriptor above 2: a daemon that kept the socket
            // Foundation's Process watches would make `run` wait for it forever.
            _ = try run("/bin/bash", ["-c", Self.closeDescriptors + "exec /usr/sbin/\(daemon) -d"])
            guard eventually(.seconds(30), { alive(pidFile) }), let pid = pid(pidFile) else {
                throw TestFailure("\(daemon) -d did not start (no live PID in \(pidFile))")
            }
            started.append(pid)
        }
        let ready = eventually(.seconds(60)) { (try? virsh(["list", "--all"], expect: nil))?.status == 0 }
        guard ready else { throw TestFailure("libvirtd does not answer virsh -c qemu:///system") }
        return Started(pids: started.reversed())
    }

    /// A TCG domain booting the drill's kernel and initramfs, its disk the NBD export, its
    /// console a file (docs/operations.md shows the same for a real VM).
    static func domainXML(name: String, kernel: String, initrd: String, nbdPort: Int, export: String, console: String) -> String {
        """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>256</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='q35'>hvm</type>
            <kernel>\(kernel)</kernel>
            <initrd>\(initrd)</initrd>
            <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
          </os>
          <features><acpi/><apic/></features>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>destroy</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <disk type='network' device='disk'>
              <driver name='qemu' type='raw' cache='none'/>
              <source protocol='nbd' name='\(export)'>
                <host name='127.0.0.1' port='\(nbdPort)'/>
              </source>
              <target dev='vda' bus='virtio'/>
            </disk>
            <serial type='file'>
              <source path='\(console)'/>
              <target port='0'/>
            </serial>
            <memballoon model='none'/>
          </devices>
        </domain>

        """
    }
}
